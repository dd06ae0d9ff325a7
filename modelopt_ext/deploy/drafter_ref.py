"""What `--draft` names, for the serve commands: a training checkpoint, an exported folder, or a hub id.

A training checkpoint (`epoch_E_step_S/`) is exported to a sibling folder `<name>-hf` first (reused when it
is newer than the checkpoint's weights). Nothing here imports an inference engine, nor torch at import time (the CLIs answer fast).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modelopt_ext.deploy import is_training_checkpoint
from modelopt_ext.drafters.hf_folder import weight_keys  # noqa: F401 (re-exported for the serve commands)
from modelopt_ext.targets.locate import looks_like_hub_id
from modelopt_ext.util.fileio import read_json_object

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


def drafter_of_plan(plan: DraftPlan, name: str | None = None):
    """The drafter the plan's folder belongs to (its config.json says); `name` (or the default) for a hub id."""
    from modelopt_ext.drafters import UnknownDrafter, drafter_for_config, resolve_drafter

    try:
        if plan.kind == "hub":
            return resolve_drafter(name)
        folder = plan.export_from if plan.export_from is not None else Path(plan.path)
        if plan.kind == "checkpoint" and plan.export_from is None:
            folder = Path(plan.source)
        return drafter_for_config(read_config(folder), str(folder / "config.json"))
    except UnknownDrafter as e:
        raise ServeError(f"--draft {plan.source}: {e}") from None


def config_folder(plan: DraftPlan) -> Path | None:
    """The local folder whose config.json describes the drafter: the export, or for a checkpoint not exported
    yet the checkpoint itself; None for a hub id. The drafter reads its serve defaults there (e.g. a block size)."""
    if plan.kind == "hub":
        return None
    return plan.export_from if plan.export_from is not None else Path(plan.path)


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

def read_config(folder: Path) -> dict:
    """The drafter's config.json as a dict (ServeError naming the file when unreadable)."""
    try:
        return read_json_object(folder / "config.json")
    except ValueError as e:
        raise ServeError(str(e)) from None

