"""Drafter models (EAGLE-3)."""
