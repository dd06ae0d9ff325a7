"""Typed configuration shared by the launcher and the trainer.

Nothing in this package imports torch or any ML library: the launcher uses `errors` and `overrides` for job
specs, and `recipe` to validate a task's recipe and overrides before anything is submitted.
"""
