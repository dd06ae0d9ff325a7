"""What `--draft` names, for the serve commands: a training checkpoint, an exported folder, or a hub id.

A training checkpoint (`epoch_E_step_S/`) is exported to a sibling folder `<name>-hf` first (reused when it
is newer than the checkpoint's weights). Nothing here imports an inference engine, nor torch at import time (the CLIs answer fast).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from modelopt_ext.deploy import is_training_checkpoint
from modelopt_ext.util.fileio import read_json_object
from modelopt_ext.targets.locate import looks_like_hub_id

MODEL_FILE = "model.safetensors"


class ServeError(Exception):
    """A bad serve request; the message is one actionable line."""


@dataclass
class DraftPlan:
    """Where the engine will load the drafter from, and what has to be written first."""

    kind: str  # "checkpoint" | "export" | "hub"
    source: str  # what the user passed
    path: str  # what the engine gets (a folder or a hub id)
    export_from: Path | None = None  # a checkpoint to export to `path` before launching
    notes: list[str] = field(default_factory=list)


def export_dir_for(ckpt: Path) -> Path:
    """The sibling folder a checkpoint is exported to: `<parent>/<name>-hf`."""
    return ckpt.parent / f"{ckpt.name}-hf"


def _fresh_export(out: Path, ckpt: Path) -> bool:
    if not (out / MODEL_FILE).is_file():
        return False
    from modelopt_ext.deploy.export import ExportError, check_export  # torch: only when needed

    try:
        check_export(out)
    except (ExportError, KeyError, ValueError):
        return False
    return (out / MODEL_FILE).stat().st_mtime >= (ckpt / MODEL_FILE).stat().st_mtime


def plan_draft(draft: str) -> DraftPlan:
    """Classify `--draft` and decide what the engine loads. Raises ServeError on a path that is unusable."""
    p = Path(draft).expanduser()
    if p.is_dir():
        if is_training_checkpoint(p):
            out = export_dir_for(p)
            if _fresh_export(out, p):
                return DraftPlan("checkpoint", draft, str(out), notes=[f"reusing the export {out}"])
            return DraftPlan("checkpoint", draft, str(out), export_from=p, notes=[f"exporting {p} to {out}"])
        if (p / "config.json").is_file():
            return DraftPlan("export", draft, str(p))
        raise ServeError(
            f"--draft {draft}: a folder without config.json (neither a checkpoint nor an exported drafter)"
        )
    if p.exists():
        raise ServeError(f"--draft {draft}: not a folder")
    if looks_like_hub_id(draft):
        return DraftPlan(
            "hub", draft, draft, notes=[f"{draft}: not a local folder; passed through as a hub id"]
        )
    raise ServeError(f"--draft {draft}: no such folder (and not a hub id like org/name)")


def materialise(plan: DraftPlan) -> str:
    """Write what the plan needs (the export of a checkpoint); returns the path the engine loads."""
    if plan.export_from is not None:
        from modelopt_ext.deploy.export import ExportError, export_checkpoint

        try:
            export_checkpoint(plan.export_from, plan.path)
        except ExportError as e:
            raise ServeError(f"cannot export --draft {plan.source}: {e}") from None
    return plan.path


# --- inspection of a local drafter folder ----------------------------------------------------------------

_PARALLEL_KEYS = ("parallel_drafting", "ptd", "use_parallel_drafting", "parallel_draft")
_PARALLEL_COUNT_KEYS = ("num_parallel_heads", "parallel_draft_heads", "num_parallel_tokens", "ptd_num_tokens")


def read_config(folder: Path) -> dict:
    """The drafter's config.json as a dict (ServeError naming the file when unreadable)."""
    try:
        return read_json_object(folder / "config.json")
    except ValueError as e:
        raise ServeError(str(e)) from None


def weight_keys(folder: Path) -> list[str]:
    """Tensor names of the folder's safetensors files, read from the headers only."""
    from safetensors import safe_open

    keys: list[str] = []
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == "vocab_mapping.safetensors":
            continue
        with safe_open(str(f), framework="pt") as h:
            keys.extend(h.keys())
    return keys


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


def infer_num_layers(keys: list[str]) -> int:
    """Decoder layers in the weights: distinct `layers.N.` indices (`midlayer.` counts as one)."""
    idx = {int(m.group(1)) for k in keys if (m := re.match(r"^(?:model\.)?layers\.(\d+)\.", k))}
    if idx:
        return max(idx) + 1
    return 1 if any(k.startswith(("midlayer.", "model.midlayer.")) for k in keys) else 0
