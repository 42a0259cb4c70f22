"""Training: optimizer groups, loss, the sharded train step, checkpointing and metrics."""
