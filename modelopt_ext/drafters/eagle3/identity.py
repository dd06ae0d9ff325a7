"""What marks a config or folder as EAGLE-3's: the architecture its exports declare, the markers of a
parallel-drafting (P-EAGLE) head, and its default target layers. No torch. A module of its own so that the plugin (`__init__`), its format
and its SGLang folder logic share one definition without importing each other."""

from __future__ import annotations

ARCHITECTURE = "LlamaForCausalLMEagle3"  # what exports declare (hf_format.py writes it)


_PARALLEL_KEYS = ("parallel_drafting", "ptd", "use_parallel_drafting", "parallel_draft")
_PARALLEL_COUNT_KEYS = ("num_parallel_heads", "parallel_draft_heads", "num_parallel_tokens", "ptd_num_tokens")


def parallel_drafting_reason(cfg: dict, keys: list[str]) -> str | None:
    """Why this looks like a parallel-drafting (P-EAGLE) head, or None."""
    for scope, d in (("config", cfg), ("config.eagle_config", cfg.get("eagle_config") or {})):
        if not isinstance(d, dict):
            continue
        for k in _PARALLEL_KEYS:
            if d.get(k):
                return f"{scope} has {k}: {d[k]!r}"
        for k in _PARALLEL_COUNT_KEYS:
            if isinstance(d.get(k), int) and d[k] > 1:
                return f"{scope} has {k}: {d[k]}"
    if any(k.split(".")[-1] == "mask_hidden" or k.startswith("mask_hidden") for k in keys):
        return "its weights hold mask_hidden (the parallel-drafting mask state)"
    return None


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """Low, middle and high layers (vLLM numbering), the common EAGLE-3 choice: [2, L//2, L-3].

    For shallow targets (tests) the ids are clamped into [1, L-1]; when that leaves fewer than three
    distinct ids, [1, L//2, L-1] is used instead, because vLLM's and SGLang's EAGLE-3 heads size `fc`
    for three aux layers.
    """
    if num_layers < 2:
        raise ValueError(f"target has {num_layers} layers; EAGLE-3 needs at least 2")
    ids = sorted({min(max(i, 1), num_layers - 1) for i in (2, num_layers // 2, num_layers - 3)})
    if len(ids) < 3:
        ids = sorted({1, num_layers // 2, num_layers - 1})
    return ids
