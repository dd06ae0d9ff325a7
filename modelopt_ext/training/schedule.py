"""Learning-rate schedules: constant, linear or cosine decay after a linear warmup.

The schedule is a picklable callable object (not a closure) so `LambdaLR.state_dict()` holds only plain
numbers and a checkpoint reloads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class LRMultiplier:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based: the step about to be taken).

    Warmup ramps linearly from 1/(warmup+1) to 1 over `warmup_steps` steps (never 0, so the first step
    learns); then `constant` stays at 1, `linear` decays to `min_ratio` at `total_steps`, `cosine` follows a
    half cosine down to `min_ratio`.
    """

    schedule: str
    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 (got {self.total_steps})")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (got {self.warmup_steps})")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step; its state_dict is plain numbers (weights_only-safe)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRMultiplier(schedule, warmup_steps, total_steps, min_ratio)
    )
