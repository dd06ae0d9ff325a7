"""Checkpoint formats leaving the trainer: the HF export vLLM and SGLang load."""
