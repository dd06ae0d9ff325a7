"""Checkpoint formats leaving the trainer: the HF export vLLM and SGLang load.

This package's top level imports no torch (the serve CLIs use it to classify folders fast).
"""

from __future__ import annotations

import json
from pathlib import Path


def is_training_checkpoint(path: Path) -> bool:
    """A trainer checkpoint folder: trainer_state.json, or a config with our `aux_layer_ids` field."""
    if (path / "trainer_state.json").is_file():
        return True
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "aux_layer_ids" in cfg and "architectures" not in cfg
