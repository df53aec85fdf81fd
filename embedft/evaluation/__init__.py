"""Evaluation: metrics as plain functions, FAISS indexes, one evaluator per task, the report and plots."""
