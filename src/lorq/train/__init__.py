"""Data, the training loop, checkpoints, precision."""
