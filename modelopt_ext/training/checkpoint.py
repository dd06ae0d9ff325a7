"""Training checkpoints: `OUTPUT/epoch_E_step_S/`, written atomically, found and validated for resume.

Layout (the export reads exactly this):
    model.safetensors          the draft state_dict, including the `d2t`/`t2d` buffers
    config.json                the drafter's config (`Built.config`: `drafter` + its fields) + `target_model`
    vocab_mapping.safetensors  the draft vocabulary (DraftVocab.save)
    optimizer.pt               optimizer state_dict
    scheduler.pt               LR scheduler state_dict
    rng_state_<rank>.pt        python/numpy/torch(/cuda) RNG states of each rank
    trainer_state.json         epoch, global step, data position, samples/tokens seen, world size, metrics
    recipe.yaml                the resolved recipe

Writing: rank 0 creates `OUTPUT/.tmp-epoch_E_step_S/`, every rank writes its RNG state into it, rank 0
the rest, then (after a barrier) rank 0 renames it into place. A crash leaves only a `.tmp-` folder, which
is never picked up and is replaced by the next save. `OUTPUT` must be shared storage across nodes.
Pickles are loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from modelopt_ext.training.distributed import DistEnv, barrier

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab_mapping.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
REQUIRED_FILES = (
    MODEL_FILE,
    CONFIG_FILE,
    VOCAB_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    RECIPE_FILE,
)
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^epoch_(\d+)_step_(\d+)$")


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from (missing, incomplete, or for another setup)."""


def checkpoint_name(epoch: int, step: int) -> str:
    """`epoch_E_step_S`."""
    return f"epoch_{epoch}_step_{step}"


def rng_file(rank: int) -> str:
    """The RNG-state file of one rank."""
    return f"rng_state_{rank}.pt"


# --- RNG state -----------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training step may touch, in weights_only-loadable types (no numpy objects)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's device only: get_rng_state_all() would open a CUDA context on every visible GPU
        # from every rank (hundreds of MB each on an 8-GPU node).
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` saved."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --- writing -------------------------------------------------------------------------------------------


@dataclass
class CheckpointContent:
    """What rank 0 writes (other ranks pass only their rank via DistEnv)."""

    model_state: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    vocab: Any  # has .save(dir) writing vocab_mapping.safetensors
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    trainer_state: dict[str, Any]
    recipe: dict[str, Any]
    extra_files: dict[str, bytes] = field(default_factory=dict)


def save_checkpoint(
    output_dir: str | Path, epoch: int, step: int, env: DistEnv, content: CheckpointContent | None
) -> Path:
    """Write `output_dir/epoch_E_step_S/` atomically. Collective: every rank must call it.

    Rank 0 passes `content`; other ranks may pass None (they only write their RNG state).
    """
    out = Path(output_dir)
    name = checkpoint_name(epoch, step)
    final = out / name
    tmp = out / f"{TMP_PREFIX}{name}"
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(env)
    torch.save(capture_rng_state(), tmp / rng_file(env.rank))
    if env.is_main:
        if content is None:
            raise ValueError("rank 0 must pass the checkpoint content")
        _write_content(tmp, content)
    barrier(env)
    if env.is_main:
        _fsync_dir(tmp)
        if final.exists():
            # Re-saving a step (a resume from an earlier checkpoint): swap, then drop the old one.
            old = out / f"{TMP_PREFIX}old-{name}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(out)
    barrier(env)
    return final


def _write_content(folder: Path, c: CheckpointContent) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in c.model_state.items()}
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(c.model_config, indent=2, sort_keys=True) + "\n")
    c.vocab.save(folder)
    if not (folder / VOCAB_FILE).is_file():
        raise RuntimeError(f"vocab.save() did not write {VOCAB_FILE}")
    torch.save(c.optimizer_state, folder / OPTIMIZER_FILE)
    torch.save(c.scheduler_state, folder / SCHEDULER_FILE)
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(c.recipe, sort_keys=False))
    for fname, data in c.extra_files.items():
        (folder / fname).write_bytes(data)
    # trainer_state.json last: its presence with a parseable body is part of the completeness check.
    (folder / STATE_FILE).write_text(json.dumps(c.trainer_state, indent=2, sort_keys=True) + "\n")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- finding and validating ----------------------------------------------------------------------------


def parse_name(path: Path) -> tuple[int, int] | None:
    """(epoch, step) of a checkpoint folder name, or None if it is not one."""
    m = _NAME.match(path.name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def validate_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint folder is complete; return its trainer state. Raises CheckpointError."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a checkpoint folder")
    missing = [f for f in REQUIRED_FILES if not (p / f).is_file()]
    if missing:
        raise CheckpointError(f"{p}: incomplete checkpoint, missing {', '.join(missing)}")
    try:
        state = json.loads((p / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}/{STATE_FILE}: unreadable ({e})") from None
    for key in ("epoch", "global_step", "data_position", "world_size"):
        if not isinstance(state.get(key), int):
            raise CheckpointError(f"{p}/{STATE_FILE}: missing integer field {key!r}")
    ranks = [r for r in range(state["world_size"]) if not (p / rng_file(r)).is_file()]
    if ranks:
        raise CheckpointError(f"{p}: incomplete checkpoint, missing RNG state of rank(s) {ranks}")
    return state


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders under output_dir (temp folders excluded), oldest first by global step."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(parse_name(p), p) for p in out.iterdir() if p.is_dir() and parse_name(p) is not None]
    return [p for key, p in sorted(found, key=lambda kp: (kp[0][1], kp[0][0]))]


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest COMPLETE checkpoint (incomplete or corrupt ones are skipped), or None."""
    for p in reversed(list_checkpoints(output_dir)):
        try:
            validate_checkpoint(p)
        except CheckpointError:
            continue
        return p
    return None


RESUME_AUTO = "auto"
RESUME_NEVER = "never"
REPLACED_PREFIX = "replaced-"


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`--resume` -> the checkpoint folder to continue from, or None to start fresh.

    - None or 'auto' (the default): the newest complete checkpoint in output_dir, or fresh when the folder
      holds no checkpoint at all. A requeued or re-run job therefore continues instead of overwriting.
      Checkpoint folders that are all incomplete are refused (CheckpointError): starting fresh over them
      must be asked for with 'never'.
    - 'never': fresh (the caller moves old checkpoints aside with `set_aside_checkpoints`).
    - a path: that checkpoint, validated.
    """
    if resume is None or resume == "" or resume == RESUME_AUTO:
        latest = find_latest_checkpoint(output_dir)
        if latest is None and list_checkpoints(output_dir):
            raise CheckpointError(
                f"{output_dir} holds checkpoints but none is complete; pass --resume never to start fresh "
                "there (they are moved aside) or --resume PATH"
            )
        return latest
    if resume == RESUME_NEVER:
        return None
    path = Path(resume)
    validate_checkpoint(path)
    return path


def set_aside_checkpoints(output_dir: str | Path, stamp: str) -> Path | None:
    """Move the checkpoint folders of an earlier run (and their temp folders) into
    `output_dir/replaced-<stamp>/`, so a fresh run (`--resume never`) never mixes with them and a later
    'auto' resume cannot pick an old, higher-step checkpoint. Returns that folder, or None if nothing moved."""
    out = Path(output_dir)
    old = list_checkpoints(out)
    if out.is_dir():
        old += [p for p in out.iterdir() if p.is_dir() and p.name.startswith(TMP_PREFIX)]
    if not old:
        return None
    dest = out / f"{REPLACED_PREFIX}{stamp}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in old:
        os.rename(p, dest / p.name)
    _fsync_dir(out)
    return dest


# --- loading -------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back for resuming on one rank."""

    path: Path
    model_state: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    trainer_state: dict[str, Any]
    rng_state: dict[str, Any] | None  # None when this rank has no saved state (world size changed)


def load_checkpoint(
    path: str | Path, rank: int = 0, map_location: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Read a validated checkpoint (pickles with weights_only=True)."""
    p = Path(path)
    state = validate_checkpoint(p)
    rng_path = p / rng_file(rank)
    return LoadedCheckpoint(
        path=p,
        model_state=load_file(str(p / MODEL_FILE), device="cpu"),
        model_config=json.loads((p / CONFIG_FILE).read_text()),
        optimizer_state=torch.load(p / OPTIMIZER_FILE, map_location=map_location, weights_only=True),
        scheduler_state=torch.load(p / SCHEDULER_FILE, map_location="cpu", weights_only=True),
        trainer_state=state,
        rng_state=torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.is_file() else None,
    )
