"""Training: the loop, optimizer and schedule, checkpoints, metrics and the peak that MFU uses."""
