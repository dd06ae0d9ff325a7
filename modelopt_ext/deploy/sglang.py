"""SGLang launch for an EAGLE-3 drafter: the folder SGLang needs, its token map, and the command line.

SGLang is a GPU-cluster dependency (CUDA-only; it replaces torch): it is never imported here. Its presence is
checked with `importlib.util.find_spec` (or, for another interpreter, a subprocess that does the same).

What SGLang needs from the drafter folder, beyond what vLLM needs:
- `architectures: ["LlamaForCausalLMEagle3"]` and `num_hidden_layers` equal to the layers in the weights
  (older exports name other architectures or keep the target's layer count);
- the decoder layer's weights named `midlayer.*`, as SGLang's EAGLE-3 model (and SpecForge) name it; our
  exports and vLLM use `layers.0.*` (vLLM maps `midlayer.` to it), so the SGLang copy renames them
  (`--layer-name layers.0` keeps them, for an SGLang that reads that name);
- a token map (`--speculative-token-map`, a .pt of the draft vocabulary's target ids) when the draft vocabulary
  is smaller than the target's and the weights carry no `d2t` for SGLang to derive it from; it is regenerated
  from the vocabulary metadata (`vocab_mapping.safetensors`, or `t2d` in the weights).
When anything has to change, a copy `<folder>-sglang` is written (atomically; unchanged files hard-linked)
and the original is left as it is. Parallel-drafting (P-EAGLE) heads are refused: SGLang cannot serve them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modelopt_ext.util.fileio import replace_dir_atomically
from modelopt_ext.deploy.drafter_ref import (
    DraftPlan,
    ServeError,
    drafter_of_plan,
    infer_num_layers,
    materialise,
    plan_draft,
    read_config,
    weight_keys,
)
from modelopt_ext.drafters.eagle3 import ARCHITECTURE, parallel_drafting_reason

if TYPE_CHECKING:
    import torch

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
    token_map_pending: bool = False  # token ids known only once the checkpoint is exported
    layer_name: str = "midlayer"
    rename_from: str | None = None  # weight-name prefix to rename to `layer_name.` in the copy
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


_LAYER_PREFIXES = ("layers.0.", "midlayer.")


def _inspect(
    folder: Path, token_map_mode: str, layer_name: str
) -> tuple[dict, torch.Tensor | None, str | None, list[str]]:
    """For a local drafter folder: (config changes SGLang needs, token ids for a token map or None, the layer
    prefix to rename to `layer_name` or None, notes)."""
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
    want = f"{layer_name}."
    other = next(p for p in _LAYER_PREFIXES if p != want)
    rename = other if layers == 1 and any(k.startswith(other) for k in keys) else None
    if rename:
        notes.append(
            f"weights renamed {rename}* -> {want}* (the decoder layer's name in SGLang's EAGLE-3 model)"
        )
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
    return changes, ids, rename, notes


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
    layer_name: str = "midlayer",
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
    if layer_name not in ("midlayer", "layers.0"):
        raise ServeError(f"--layer-name must be midlayer or layers.0, got {layer_name!r}")
    dp = plan_draft(draft)
    plan = SglangPlan(draft=dp, draft_path=dp.path, layer_name=layer_name, notes=list(dp.notes))
    if dp.kind == "checkpoint":
        # Our export (written first): LlamaForCausalLMEagle3, one layer named layers.0, d2t for a reduced
        # vocabulary. SGLang needs only the layer renamed (unless told otherwise) and a token map if asked.
        folder = Path(dp.path)
        if layer_name == "midlayer":
            plan.rename_from = "layers.0."
            plan.notes.append("weights renamed layers.0.* -> midlayer.* (the decoder layer's name in SGLang)")
        if plan.rename_from or token_map_mode == "always":
            plan.copy_from = folder
            plan.token_map_pending = token_map_mode == "always"
    elif dp.kind == "export":
        folder = Path(dp.path)
        changes, ids, rename, notes = _inspect(folder, token_map_mode, layer_name)
        plan.notes += notes
        if changes or ids is not None or rename:
            plan.copy_from = folder
            plan.config_changes = changes
            plan.token_ids = ids
            plan.rename_from = rename
    if plan.copy_from is not None:
        plan.draft_path = str(plan.copy_from.parent / f"{plan.copy_from.name}-sglang")
    if plan.token_map_pending or plan.token_ids is not None:
        plan.token_map = Path(plan.draft_path) / TOKEN_MAP
    spec = drafter_of_plan(dp).sglang_args(
        plan.draft_path, num_steps=num_steps, topk=topk, num_draft_tokens=num_draft_tokens
    )
    if algorithm is not None:  # e.g. EAGLE for an EAGLE-3 head SGLang should run the EAGLE-2 way
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
    src = plan.copy_from
    if plan.token_map_pending and plan.token_ids is None:
        _, plan.token_ids, _, _ = _inspect(src, "always", plan.layer_name)
    out = Path(plan.draft_path)
    with replace_dir_atomically(out) as tmp:
        for f in src.iterdir():
            if not f.is_file() or f.name == "config.json":
                continue
            if plan.rename_from and f.suffix == ".safetensors" and f.name != "vocab_mapping.safetensors":
                _write_renamed(f, tmp / f.name, plan.rename_from, f"{plan.layer_name}.")
            else:
                _link_or_copy(f, tmp / f.name)
        cfg = {**read_config(src), **plan.config_changes}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if plan.token_ids is not None:
            torch.save(plan.token_ids.to(torch.int64).contiguous(), tmp / TOKEN_MAP)
