"""Import nemo_run the way the launcher needs it: NEMORUN_HOME set first, and without torch.

nemo_run reads NEMORUN_HOME once, at import time, and otherwise writes under ~/.nemo_run; it also imports
torch when it can (only to register a YAML representer). The launcher imports no ML package, so torch
is hidden while nemo_run loads (a process that already imported torch keeps it).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import ModuleType

_BLOCKED = ("torch", "transformers", "vllm", "sglang")


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
