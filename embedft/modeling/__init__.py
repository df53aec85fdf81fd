"""Modeling: model families, the Encoder (text -> vector), its runtime, and LoRA on it."""
