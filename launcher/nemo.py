"""The launcher's adapter to nemo_run: importing it, and the few private attributes the launcher needs.

Import: nemo_run reads NEMORUN_HOME once, at import time, and otherwise writes under ~/.nemo_run; it also
imports torch when it can (only to register a YAML representer). The launcher imports no ML package, so
torch is hidden while nemo_run loads (a process that already imported torch keeps it).

Private attributes: nemo_run has no public API for three things the launcher needs, so they are read here
and nowhere else (tests/launcher/test_nemo_adapter.py checks them against the installed nemo_run):
- the rendered sbatch script of a dry run (`Job._dryrun_info.request.materialize()`), which `--dryrun`
  prints and keeps;
- the experiment folder (`Experiment._exp_dir`), removed after a dry run or a failed submission, and where
  the local executor writes a task's log;
- the tunnels' packaging jobs (`Tunnel.packaging_jobs`), cleared so `Experiment.run` packages again after
  the launcher's own dry run.
When a nemo_run release changes one of them, NemoRunChanged says which, instead of an AttributeError
deep inside a submission.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

_BLOCKED = ("torch", "transformers", "vllm", "sglang")
TESTED_VERSION = "0.11.1"  # the nemo_run whose private attributes this module reads (uv.lock pins it)


class NemoRunChanged(RuntimeError):
    """The installed nemo_run no longer has a private attribute the launcher relies on."""


def import_nemo_run(nemorun_home: Path) -> ModuleType:
    """Return the nemo_run module, importing it with NEMORUN_HOME=nemorun_home (unless the user set one)."""
    os.environ.setdefault("NEMORUN_HOME", str(nemorun_home))
    if "nemo_run" in sys.modules:
        return sys.modules["nemo_run"]
    hidden = [m for m in _BLOCKED if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]  # makes `import torch` raise ModuleNotFoundError
    try:
        import nemo_run
    finally:
        for m in hidden:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]
    # nemo_run logs every submission step at INFO through rich; the launcher prints its own summary.
    for name in ("nemo_run", "torchx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return nemo_run


def _private(obj: object, name: str, purpose: str) -> Any:
    try:
        value = getattr(obj, name)
    except AttributeError:
        value = None
    if value is None:
        raise NemoRunChanged(
            f"nemo_run {_version()} has no {type(obj).__name__}.{name} (the launcher reads it for {purpose}; "
            f"launcher/nemo.py adapts nemo_run {TESTED_VERSION}'s private attributes: update it for this release)"
        )
    return value


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("nemo_run")
    except Exception:  # noqa: BLE001 - only for the message
        return "(unknown version)"


def dryrun_script(job: object) -> str:
    """The exact sbatch script a dry-run job would submit (after `Experiment.dryrun`)."""
    info = _private(job, "_dryrun_info", "the rendered sbatch script of --dryrun")
    request = _private(info, "request", "the rendered sbatch script of --dryrun")
    return request.materialize()


def experiment_dir(exp: object) -> Path:
    """The experiment's folder (its tasks' scripts and the local executor's logs live under it)."""
    return Path(_private(exp, "_exp_dir", "the experiment folder"))


def reset_packaging(exp: object) -> None:
    """Forget the packaging done by a dry run, so that `Experiment.run` packages (and renders) again."""
    tunnels = _private(exp, "tunnels", "the experiment's tunnels")
    for tunnel in tunnels.values():
        _private(tunnel, "packaging_jobs", "re-packaging after the dry run").clear()
