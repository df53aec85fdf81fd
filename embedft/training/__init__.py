"""Training: the one loop, its losses, batches' token ids, hard-negative mining, validation, checkpoints."""
