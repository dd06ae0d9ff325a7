"""SGLang launch for a drafter: the folder SGLang loads, its token map, and the command line.

SGLang is a GPU-cluster dependency (CUDA-only; it replaces torch): it is never imported here. Its presence is
checked with `importlib.util.find_spec` (or, for another interpreter, a subprocess that does the same).

The drafter decides its flags (`Drafter.sglang_args`) and what SGLang needs changed in its folder
(`Drafter.sglang_folder`, e.g. EAGLE-3's layer rename and token map: drafters/eagle3/sglang_folder.py). When
anything has to change, a copy `<folder>-sglang` is written (atomically; unchanged files hard-linked) and the
original is left as it is.
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
    config_folder,
    drafter_of_plan,
    materialise,
    plan_draft,
    read_config,
)
from modelopt_ext.drafters.base import SglangFolder
from modelopt_ext.util.fileio import replace_dir_atomically

TOKEN_MAP = "sglang_token_map.pt"
INSTALL_HINT = (
    "sglang is not installed for {python}. SGLang is CUDA-only and brings its own torch: install it on a GPU "
    "node in its own environment (pip install 'sglang[all]'), then pass that interpreter with --python, or use "
    "--print-only to see the command"
)


@dataclass
class SglangPlan:
    """Everything needed to launch: the draft plan, the folder SGLang loads and what to write there, the argv."""

    draft: DraftPlan
    draft_path: str  # what --speculative-draft-model-path gets
    copy_from: Path | None = None  # folder to copy into draft_path with the drafter's changes
    folder: SglangFolder = field(default_factory=SglangFolder)  # the drafter's changes (none: load as is)
    options: dict = field(default_factory=dict)  # the drafter's folder options (asked again once exported)
    token_map: Path | None = None
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


def plan_sglang(
    target: str,
    draft: str,
    *,
    algorithm: str | None = None,
    num_steps: int | None = None,
    topk: int | None = None,
    num_draft_tokens: int | None = None,
    port: int = 30000,
    host: str = "0.0.0.0",
    tp_size: int = 1,
    python: str = "python",
    options: dict[str, str] | None = None,
    extra: list[str] | None = None,
    drafter_name: str | None = None,
) -> SglangPlan:
    """Decide the SGLang command (and the files it needs) without writing anything.

    `num_steps`/`topk`/`num_draft_tokens`: None = the drafter's defaults. `options`: the drafter's folder
    options (EAGLE-3: `layer_name`, `token_map`). `drafter_name`: for a hub id (default eagle3).
    """
    if any(v is not None and v < 1 for v in (num_steps, topk, num_draft_tokens, tp_size)):
        raise ServeError("--num-steps, --topk, --num-draft-tokens and --tp-size must be >= 1")
    dp = plan_draft(draft)
    drafter = drafter_of_plan(dp, drafter_name)
    if algorithm is not None and algorithm not in drafter.sglang_algorithms:
        raise ServeError(
            f"--algorithm {algorithm}: SGLang serves a {drafter.name} drafter with "
            f"{' or '.join(drafter.sglang_algorithms) or 'no algorithm this project knows'}"
        )
    options = dict(options or {})
    plan = SglangPlan(draft=dp, draft_path=dp.path, options=options, notes=list(dp.notes))
    try:
        if dp.kind in ("checkpoint", "export"):
            plan.folder = drafter.sglang_folder(Path(dp.path), exported=dp.kind == "checkpoint", options=options)
        if plan.folder.needs_copy:
            plan.copy_from = Path(dp.path)
            plan.draft_path = str(plan.copy_from.parent / f"{plan.copy_from.name}-sglang")
        spec = drafter.sglang_args(
            plan.draft_path, num_steps=num_steps, topk=topk, num_draft_tokens=num_draft_tokens,
            folder=config_folder(dp), algorithm=algorithm,
        )  # fmt: skip
    except ValueError as e:
        raise ServeError(str(e)) from None
    plan.notes += plan.folder.notes
    if plan.folder.token_map_pending or plan.folder.token_ids is not None:
        plan.token_map = Path(plan.draft_path) / TOKEN_MAP
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
    src, changes = plan.copy_from, plan.folder
    if changes.token_map_pending and changes.token_ids is None:
        # The export exists now: ask the drafter for the ids, as for an export folder given directly.
        drafter = drafter_of_plan(plan.draft)
        try:
            ids = drafter.sglang_folder(src, exported=False, options={**plan.options, "token_map": "always"})
        except ValueError as e:
            raise ServeError(str(e)) from None
        changes.token_ids = ids.token_ids
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
