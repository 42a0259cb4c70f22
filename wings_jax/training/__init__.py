"""Training: parameter groups, optimizer, loss, the planned sharded step and the loop, metrics."""
