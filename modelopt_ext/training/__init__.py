"""Training: the EAGLE-3 objective, the trainer loop, checkpoints, schedules, progress and distributed setup."""
