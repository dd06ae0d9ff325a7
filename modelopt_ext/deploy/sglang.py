"""SGLang launch for a drafter: the folder SGLang loads, its token map, and the command line.

SGLang is a GPU-cluster dependency (CUDA-only; it replaces torch): it is never imported here. Its presence is
checked with `importlib.util.find_spec` (or, for another interpreter, a subprocess that does the same).

What SGLang needs changed in a drafter folder is the drafter's decision (`Drafter.sglang_folder`, e.g.
drafters/eagle3/sglang_format.py): config fields, a weight-name prefix to rename, a token map
(`--speculative-token-map`). When anything has to change, a copy `<folder>-sglang` is written here
(atomically; unchanged files hard-linked) and the original is left as it is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from modelopt_ext.deploy.drafter_ref import (
    DraftPlan,
    ServeError,
    drafter_of_plan,
    materialise,
    plan_draft,
    read_config,
)
from modelopt_ext.drafters.base import Drafter, SglangFolder
from modelopt_ext.drafters.hf_folder import ExportError
from modelopt_ext.util.fileio import replace_dir_atomically

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
    drafter: Drafter | None = None
    copy_from: Path | None = None  # folder to copy into draft_path with the drafter's changes
    changes: SglangFolder = field(default_factory=SglangFolder)
    token_map: Path | None = None
    layer_name: str | None = None
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


def _changes(drafter: Drafter, folder: Path, *, fresh_export: bool, token_map: str, layer_name: str | None):
    try:
        return drafter.sglang_folder(folder, fresh_export=fresh_export, token_map=token_map, layer_name=layer_name)
    except ExportError as e:
        raise ServeError(f"--draft {e}") from None


def plan_sglang(
    target: str,
    draft: str,
    *,
    algorithm: str | None = None,
    num_steps: int = 3,
    topk: int = 1,
    num_draft_tokens: int = 4,
    port: int = 30000,
    host: str = "0.0.0.0",
    tp_size: int = 1,
    python: str = "python",
    token_map_mode: str = "auto",
    layer_name: str | None = None,
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
    drafter = drafter_of_plan(dp)
    plan = SglangPlan(draft=dp, draft_path=dp.path, drafter=drafter, layer_name=layer_name, notes=list(dp.notes))
    if dp.kind in ("checkpoint", "export"):
        folder = Path(dp.path)
        plan.changes = _changes(
            drafter, folder, fresh_export=dp.kind == "checkpoint", token_map=token_map_mode, layer_name=layer_name
        )
        plan.notes += plan.changes.notes
        if plan.changes.needs_copy:
            plan.copy_from = folder
            plan.draft_path = str(folder.parent / f"{folder.name}-sglang")
    if plan.changes.token_ids_pending or plan.changes.token_ids is not None:
        plan.token_map = Path(plan.draft_path) / TOKEN_MAP
    spec = drafter.sglang_args(
        plan.draft_path, num_steps=num_steps, topk=topk, num_draft_tokens=num_draft_tokens
    )
    if algorithm is not None:  # another SGLang algorithm for the same head (serve_sglang --algorithm)
        spec[spec.index("--speculative-algorithm") + 1] = algorithm
    argv = [python, "-m", "sglang.launch_server", "--model-path", target, *spec]
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


def _write_renamed(src: Path, dst: Path, old: str, new: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as h:
        tensors = {(new + k[len(old) :] if k.startswith(old) else k): h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 (safe_open is not iterable)
        metadata = h.metadata()
    save_file(tensors, str(dst), metadata=metadata)


def prepare(plan: SglangPlan) -> None:
    """Write what the plan needs: the checkpoint's export, then the SGLang copy and token map (atomic)."""
    import torch

    materialise(plan.draft)
    if plan.copy_from is None:
        return
    src, changes = plan.copy_from, plan.changes
    if changes.token_ids_pending and changes.token_ids is None:
        # The export exists now: ask the drafter again for the ids of its vocabulary.
        ids = _changes(plan.drafter, src, fresh_export=False, token_map="always", layer_name=plan.layer_name).token_ids
        changes.token_ids = ids
    out = Path(plan.draft_path)
    with replace_dir_atomically(out) as tmp:
        for f in src.iterdir():
            if not f.is_file() or f.name == "config.json":
                continue
            if changes.rename and f.suffix == ".safetensors" and f.name != "vocab_mapping.safetensors":
                _write_renamed(f, tmp / f.name, *changes.rename)
            else:
                _link_or_copy(f, tmp / f.name)
        cfg = {**read_config(src), **changes.config_changes}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if changes.token_ids is not None:
            torch.save(changes.token_ids.to(torch.int64).contiguous(), tmp / TOKEN_MAP)
