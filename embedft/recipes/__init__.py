"""Recipes: the only place the stages are wired together (train, eval, sweep)."""
