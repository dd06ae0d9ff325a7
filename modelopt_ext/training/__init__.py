"""Training: the trainer loop (drafters bring their model and objective), checkpoints, schedules, progress and distributed setup."""
