"""Training: config, the loop, losses, schedules, checkpointing and logging."""
