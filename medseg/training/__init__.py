"""Training: the loop, checkpoints, run directories."""
