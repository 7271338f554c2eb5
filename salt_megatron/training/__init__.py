"""Training: flags, the train loop, checkpoints, logging."""
