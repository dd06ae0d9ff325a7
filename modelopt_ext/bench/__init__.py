"""Benchmarks: speculative decoding acceptance length and speed."""
