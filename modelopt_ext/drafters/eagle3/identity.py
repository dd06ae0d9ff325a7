"""What marks a config or folder as EAGLE-3's: the architecture its exports declare, and the markers of a
parallel-drafting (P-EAGLE) head. No torch. A module of its own so that the plugin (`__init__`), its format
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
