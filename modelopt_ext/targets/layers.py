"""Which target layers a hidden-state server captures, and how the captured stack splits for the trainer.

vLLM numbering (the one `eagle_aux_hidden_state_layer_ids` uses): id k < L is the residual stream after k
decoder layers (0 = embeddings), equal to transformers' `hidden_states[k]`; id L is the last decoder layer's
output BEFORE the final norm (transformers' `hidden_states[L]` is after it). A server captures the drafter's
aux layers plus L; the trainer concatenates the aux ones and turns L into target logits through the target's
final norm + lm_head (`TargetHead`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from modelopt_ext.config.recipe import default_aux_layer_ids
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


def capture_layer_ids(num_layers: int, aux_layer_ids: Sequence[int] | None = None) -> list[int]:
    """The ids a server captures: the drafter's aux layers (default rule if None) followed by L.

    Raises ValueError for ids outside [0, L) or duplicates (L itself is appended here, never an aux id).
    """
    aux = list(aux_layer_ids) if aux_layer_ids is not None else default_aux_layer_ids(num_layers)
    if not aux:
        raise ValueError("aux_layer_ids is empty")
    bad = [i for i in aux if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"aux_layer_ids {bad} outside [0, {num_layers}) for a {num_layers}-layer target")
    if len(set(aux)) != len(aux):
        raise ValueError(f"aux_layer_ids {aux} has duplicates")
    return [*aux, num_layers]


def check_capture_ids(num_layers: int, ids: Sequence[int]) -> list[int]:
    """Explicit capture ids (`--capture-ids`) valid for an L-layer target: the aux ids, then L itself.

    The same rule as `capture_layer_ids` (aux ids in [0, L), no duplicates), plus: the last id must be L,
    since the trainer turns the last captured layer into the target's logits. ValueError names the bad ids.
    """
    ids = list(ids)
    bad = [i for i in ids if not 0 <= i <= num_layers]
    if bad:
        raise ValueError(
            f"capture ids {bad} outside [0, {num_layers}] for a {num_layers}-layer target (vLLM numbering)"
        )
    if not ids or ids[-1] != num_layers:
        raise ValueError(
            f"capture ids {ids}: the last must be L = {num_layers} (the last layer, pre-final-norm), "
            "after the drafter's aux ids"
        )
    try:
        return capture_layer_ids(num_layers, ids[:-1])
    except ValueError as e:  # the aux part (all ids but the last): duplicates
        raise ValueError(f"capture ids {ids}: {e}") from None


def parse_capture_ids(text: str) -> list[int]:
    """'2,4, 8' -> [2, 4, 8] (the --capture-ids / EAGLE_CAPTURE_IDS form); ValueError on anything else."""
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"capture ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise ValueError("capture ids: empty list")
    return ids


def split_captured(hidden_states, num_aux: int):
    """[T, n_aux + 1, H] captured stack -> (aux [T, n_aux * H] in capture order, last [T, H] pre-norm)."""
    if hidden_states.dim() != 3 or hidden_states.shape[1] != num_aux + 1:
        raise ValueError(
            f"captured hidden states have shape {tuple(hidden_states.shape)}, expected [T, {num_aux + 1}, H]"
        )
    t = hidden_states.shape[0]
    return hidden_states[:, :num_aux].reshape(t, -1), hidden_states[:, num_aux]
