"""What a source builder hands the trainer (the builders are registered in supply/sources.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SourceSetup:
    """What a source contributes to training (built by the builders that supply/sources.py registers)."""

    dataset: Any  # map-style; item i depends only on i (resume = sampler position)
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    source: Callable[[dict[str, torch.Tensor]], Any]  # collated batch on the device -> Supervision
    head: Any  # TargetHead (final norm + lm_head [+ embeddings]) or None when targets arrive as probs
    aux_layer_ids: list[int]
    target_embeddings: torch.Tensor | None  # [V, H] to initialise the draft's embeddings
