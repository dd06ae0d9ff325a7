"""Target layers: how many a target has, whether layer ids are valid for it, what a server captures, parsing ids.

This module is THE owner of target-layer ids; every source, server, CLI, `job_info` and the exporter call
it (which layers a recipe's drafter reads is drafters/layers.py, which validates them here), and the entry
scripts forward what they decided. No torch import; no import of the drafters.

vLLM numbering (the one `eagle_aux_hidden_state_layer_ids` uses): id k < L is the residual stream after k
decoder layers (0 = embeddings), equal to transformers' `hidden_states[k]`; id L is the last decoder layer's
output BEFORE the final norm (transformers' `hidden_states[L]` is after it). A drafter reads layers in
[0, L] (its "aux" layers, from the recipe's `model.aux_layer_ids` or the drafter's default rule); a server
captures those plus L, which the trainer turns into the target's next-token distribution (`TargetHead`).
(A colocated drafter may read L itself too; a server's drafter ids stay below L, see `capture_layer_ids`.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from modelopt_ext.targets.locate import target_config


def target_num_layers(target: str | os.PathLike | dict | Any) -> int:
    """Decoder layer count of a target: a model folder or cached hub id, a config dict, or an HF config object.

    Multimodal configs keep the language model under `text_config`; that one is used.
    """
    if isinstance(target, (str, os.PathLike)):
        cfg = target_config(target)
    elif isinstance(target, dict):
        cfg = target
    else:
        cfg = target.to_dict()
    cfg = cfg.get("text_config") or cfg
    n = cfg.get("num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"target config has no valid num_hidden_layers (got {n!r})")
    return n


def check_id_list(ids: Sequence[Any]) -> list[int]:
    """The checks that need no target: a non-empty list of distinct integers >= 0. ValueError otherwise."""
    ids = list(ids)
    if not ids:
        raise ValueError("must list at least one layer id")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"layer ids {ids} must be integers")
    if any(i < 0 for i in ids):
        raise ValueError(f"layer ids {ids} must be >= 0")
    if len(set(ids)) != len(ids):
        raise ValueError(f"layer ids {ids} must be distinct")
    return ids


def check_layer_ids(num_layers: int, ids: Sequence[Any]) -> list[int]:
    """Layer ids a drafter may read from an L-layer target: distinct, in [0, L] (vLLM numbering; L = the last
    layer's pre-final-norm output)."""
    ids = check_id_list(ids)
    bad = [i for i in ids if i > num_layers]
    if bad:
        raise ValueError(
            f"layer ids {bad} outside [0, {num_layers}] for a {num_layers}-layer target (vLLM numbering)"
        )
    return ids


def capture_layer_ids(num_layers: int, aux_layer_ids: Sequence[int]) -> list[int]:
    """The ids a server captures: the drafter's layers (drafters/layers.py resolves them) followed by L.

    A server always appends L (it becomes the target's distribution), so the drafter's own ids must be < L
    here: a layer list that already holds L would ship it twice and shift every split.
    """
    ids = check_layer_ids(num_layers, aux_layer_ids)
    if num_layers in ids:
        raise ValueError(
            f"layer ids {ids}: {num_layers} (the last layer) is captured anyway as the target's distribution; "
            f"a server's drafter layers must be in [0, {num_layers})"
        )
    return [*ids, num_layers]


def check_capture_list(ids: Sequence[Any]) -> list[int]:
    """The checks of capture ids that need no target: valid ids, at least one drafter id before L."""
    ids = check_id_list(ids)
    if len(ids) < 2:
        raise ValueError(f"{ids}: needs the drafter's layer ids before the last id (the target's layer count L)")
    return ids


def check_capture_ids(num_layers: int, ids: Sequence[int]) -> list[int]:
    """Explicit capture ids (`--capture-ids`) valid for an L-layer target: the drafter's ids, then L itself.

    The last id must be L, since the trainer turns the last captured layer into the target's next-token
    distribution. ValueError names the bad ids.
    """
    ids = check_layer_ids(num_layers, ids)
    if ids[-1] != num_layers:
        raise ValueError(
            f"{ids} must end with the target's layer count {num_layers} (the last layer, pre-final-norm), "
            "after the drafter's layer ids"
        )
    check_capture_list(ids)
    try:
        return capture_layer_ids(num_layers, ids[:-1])
    except ValueError as e:
        raise ValueError(f"{ids}: {e}") from None


def drafter_ids_of_capture(capture_ids: Sequence[int]) -> list[int]:
    """The drafter's layer ids within a server's capture ids (those minus the trailing L)."""
    return list(capture_ids[:-1])


def parse_capture_ids(text: str) -> list[int]:
    """'2,4, 8', '2 4 8' or '[2, 4, 8]' -> [2, 4, 8] (every command-line and env form of layer ids); ValueError else."""
    inner = text.strip().removeprefix("[").removesuffix("]")
    try:
        ids = [int(x) for x in inner.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"layer ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise ValueError("layer ids: empty list")
    return ids

