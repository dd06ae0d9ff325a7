"""SGLang launch for an EAGLE-3 drafter: the folder SGLang needs, its token map, and the command line.

SGLang is a GPU-cluster dependency (CUDA-only; it replaces torch): it is never imported here. Its presence is
checked with `importlib.util.find_spec` (or, for another interpreter, a subprocess that does the same).

What SGLang needs from the drafter folder, beyond what vLLM needs:
- `architectures: ["LlamaForCausalLMEagle3"]` and `num_hidden_layers` equal to the layers in the weights
  (older exports name other architectures or keep the target's layer count); when they differ, a copy
  `<folder>-sglang` is written with the config rewritten and the weights hard-linked (copied across devices);
- a token map (`--speculative-token-map`, a .pt of the draft vocabulary's target ids) when the draft vocabulary
  is smaller than the target's and the weights carry no `d2t` for SGLang to derive it from; it is regenerated
  from the vocabulary metadata (`vocab_mapping.safetensors`, or `t2d` in the weights).
Parallel-drafting (P-EAGLE) heads are refused: SGLang cannot serve them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modelopt_ext.serving.drafter import (
    DraftPlan,
    ServeError,
    infer_num_layers,
    materialise,
    parallel_drafting_reason,
    plan_draft,
    read_config,
    weight_keys,
)

if TYPE_CHECKING:
    import torch

ARCHITECTURE = "LlamaForCausalLMEagle3"
TOKEN_MAP = "sglang_token_map.pt"
INSTALL_HINT = (
    "sglang is not installed for {python}. SGLang is CUDA-only and brings its own torch: install it on a GPU "
    "node in its own environment (pip install 'sglang[all]'), then pass that interpreter with --python, or use "
    "--print-only to see the command"
)


@dataclass
class SglangPlan:
    """Everything needed to launch: the draft plan, the SGLang folder and token map, the argv."""

    draft: DraftPlan
    draft_path: str  # what --speculative-draft-model-path gets
    copy_from: Path | None = None  # folder to copy into draft_path with a rewritten config
    config_changes: dict = field(default_factory=dict)
    token_map: Path | None = None
    token_ids: torch.Tensor | None = None
    argv: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def sglang_available(python: str | None = None) -> bool:
    """Whether `python` (default: this interpreter) can import sglang; never imports it here."""
    if python is None:
        return importlib.util.find_spec("sglang") is not None
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('sglang') else 1)"
    try:
        return subprocess.run([python, "-c", code], timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _vocab_ids(folder: Path, keys: list[str]) -> torch.Tensor | None:
    """Target ids of the draft vocabulary from the folder's metadata, or None when there is none."""
    import torch
    from safetensors.torch import load_file

    from modelopt_ext.data.draft_vocab import DraftVocab

    if (folder / "vocab_mapping.safetensors").is_file():
        return DraftVocab.load(folder).selected_ids
    if "t2d" in keys:
        for f in sorted(folder.glob("*.safetensors")):
            tensors = load_file(str(f))
            if "t2d" in tensors:
                return tensors["t2d"].bool().nonzero().flatten().to(torch.int64)
    return None


def _inspect(folder: Path, token_map_mode: str) -> tuple[dict, torch.Tensor | None, list[str]]:
    """(config changes SGLang needs, token ids for a token map or None, notes) for a local drafter folder."""
    cfg = read_config(folder)
    keys = weight_keys(folder)
    reason = parallel_drafting_reason(cfg, keys)
    if reason:
        raise ServeError(
            f"--draft {folder} is a parallel-drafting (P-EAGLE) head ({reason}); SGLang cannot serve it. "
            "Serve it with vLLM (python -m modelopt_ext.serve_vllm), or train a standard EAGLE-3 head for SGLang"
        )
    if not keys:
        raise ServeError(f"--draft {folder}: no *.safetensors weights")
    changes: dict = {}
    notes: list[str] = []
    if cfg.get("architectures") != [ARCHITECTURE]:
        changes["architectures"] = [ARCHITECTURE]
    layers = infer_num_layers(keys)
    if layers == 0:
        raise ServeError(f"--draft {folder}: no decoder layer weights (layers.N.* or midlayer.*)")
    if cfg.get("num_hidden_layers") != layers:
        changes["num_hidden_layers"] = layers
    if changes:
        notes.append(f"SGLang config fixes: {changes}")
    vocab, draft_vocab = cfg.get("vocab_size"), cfg.get("draft_vocab_size")
    reduced = isinstance(vocab, int) and isinstance(draft_vocab, int) and draft_vocab < vocab
    ids = None
    if token_map_mode == "always" or (token_map_mode == "auto" and reduced and "d2t" not in keys):
        ids = _vocab_ids(folder, keys)
        if ids is None:
            raise ServeError(
                f"--draft {folder}: the draft vocabulary ({draft_vocab}) is smaller than the target's ({vocab}) but "
                "there is no d2t, vocab_mapping.safetensors or t2d to map draft ids to target ids"
            )
        if isinstance(draft_vocab, int) and ids.numel() != draft_vocab:
            raise ServeError(
                f"--draft {folder}: vocabulary metadata has {ids.numel()} ids, config says {draft_vocab}"
            )
        notes.append(f"token map of {ids.numel()} target ids regenerated from the vocabulary metadata")
    return changes, ids, notes


def plan_sglang(
    target: str,
    draft: str,
    *,
    algorithm: str = "EAGLE3",
    num_steps: int = 3,
    topk: int = 1,
    num_draft_tokens: int = 4,
    port: int = 30000,
    host: str = "0.0.0.0",
    tp_size: int = 1,
    python: str = "python",
    token_map_mode: str = "auto",
    extra: list[str] | None = None,
) -> SglangPlan:
    """Decide the SGLang command (and the files it needs) without writing anything."""
    if min(num_steps, topk, num_draft_tokens, tp_size) < 1:
        raise ServeError("--num-steps, --topk, --num-draft-tokens and --tp-size must be >= 1")
    if topk == 1 and num_draft_tokens != num_steps + 1:
        raise ServeError(
            f"--num-draft-tokens must be --num-steps + 1 = {num_steps + 1} when --topk is 1 (a chain); "
            f"got {num_draft_tokens}"
        )
    dp = plan_draft(draft)
    plan = SglangPlan(draft=dp, draft_path=dp.path, notes=list(dp.notes))
    if dp.kind == "checkpoint":
        # Our own export is already what SGLang wants (LlamaForCausalLMEagle3, one layer, d2t for a reduced
        # vocabulary); a token map is only written when asked for.
        if token_map_mode == "always":
            plan.copy_from = Path(dp.path)
    elif dp.kind == "export":
        folder = Path(dp.path)
        changes, ids, notes = _inspect(folder, token_map_mode)
        plan.notes += notes
        if changes or ids is not None:
            plan.copy_from = folder
            plan.config_changes = changes
            plan.token_ids = ids
            plan.draft_path = str(folder.parent / f"{folder.name}-sglang")
    if plan.copy_from is not None and dp.kind == "checkpoint":
        plan.draft_path = str(Path(dp.path).parent / f"{Path(dp.path).name}-sglang")
    if token_map_mode == "always" or plan.token_ids is not None:
        plan.token_map = Path(plan.draft_path) / TOKEN_MAP
    argv = [
        python, "-m", "sglang.launch_server",
        "--model-path", target,
        "--speculative-algorithm", algorithm,
        "--speculative-draft-model-path", plan.draft_path,
        "--speculative-num-steps", str(num_steps),
        "--speculative-eagle-topk", str(topk),
        "--speculative-num-draft-tokens", str(num_draft_tokens),
    ]  # fmt: skip
    if plan.token_map is not None:
        argv += ["--speculative-token-map", str(plan.token_map)]
    argv += ["--host", host, "--port", str(port), "--tp-size", str(tp_size)]
    plan.argv = argv + list(extra or [])
    return plan


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another device, or links not allowed: copy
        shutil.copy2(src, dst)


def prepare(plan: SglangPlan) -> None:
    """Write what the plan needs: the checkpoint's export, then the SGLang copy and token map (atomic)."""
    import torch

    materialise(plan.draft)
    if plan.copy_from is None:
        return
    src = plan.copy_from
    if plan.draft.kind == "checkpoint" and plan.token_map is not None and plan.token_ids is None:
        _, plan.token_ids, _ = _inspect(src, "always")
    out = Path(plan.draft_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json":
                _link_or_copy(f, tmp / f.name)
        cfg = {**read_config(src), **plan.config_changes}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if plan.token_ids is not None:
            torch.save(plan.token_ids.to(torch.int64).contiguous(), tmp / TOKEN_MAP)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
