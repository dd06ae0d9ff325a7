"""Export a training checkpoint (`epoch_E_step_S/`) as the folder vLLM and SGLang load as is.

Which format is the drafter's decision (`Drafter.export`, e.g. drafters/eagle3/hf_format.py); this module
finds the drafter a checkpoint or an export belongs to and checks that the folder is what it claims to be.
"""

from __future__ import annotations

from pathlib import Path

from modelopt_ext.deploy import is_training_checkpoint
from modelopt_ext.drafters import UnknownDrafter, drafter_for_config
from modelopt_ext.drafters.base import Drafter
from modelopt_ext.drafters.hf_folder import CONFIG_FILE, ExportError, read_json

__all__ = ["ExportError", "check_export", "drafter_of", "export_checkpoint"]


def drafter_of(folder: str | Path) -> Drafter:
    """The drafter whose checkpoint or export `folder` is (ExportError naming config.json otherwise)."""
    cfg = read_json(Path(folder) / CONFIG_FILE)
    try:
        return drafter_for_config(cfg, str(Path(folder) / CONFIG_FILE))
    except UnknownDrafter as e:
        raise ExportError(str(e)) from None


def _is_export(cfg: dict) -> bool:
    try:
        drafter_for_config(cfg)
    except UnknownDrafter:
        return False
    return True


def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    include_t2d: bool = False,
    overwrite: bool = True,
) -> Path:
    """Export `ckpt_dir` (a training checkpoint) to `out_dir` (atomic, in its drafter's format).

    `dtype` casts the floating weights (default: as trained); `include_t2d` also writes the draft
    vocabulary's `t2d` into the weights where the format has one (engines skip it).
    """
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise ExportError(f"{ckpt}: not a checkpoint folder")
    cfg = read_json(ckpt / CONFIG_FILE)
    if not is_training_checkpoint(ckpt):
        arch = cfg.get("architectures")
        if arch and _is_export(cfg):
            what = "an exported drafter (already what vLLM and SGLang load)"
        elif arch:
            what = f"a model folder ({', '.join(map(str, arch))})"
        else:
            what = "no trainer_state.json and no aux_layer_ids in config.json"
        raise ExportError(
            f"{ckpt}: {what}, not a training checkpoint "
            "(export takes an epoch_E_step_S/ folder the trainer wrote under training.output_dir)"
        )
    drafter = drafter_of(ckpt)
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        raise ExportError(f"{out_dir}: already exists")
    return drafter.export(ckpt, Path(out_dir), dtype=dtype, include_t2d=include_t2d)


def check_export(out_dir: str | Path) -> dict:
    """Strictly check an exported folder in its drafter's format; returns its config. Raises ExportError."""
    return drafter_of(out_dir).check_export(Path(out_dir))
