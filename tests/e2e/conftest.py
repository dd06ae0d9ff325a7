"""The Slurm cluster fixtures of tests/slurm, for the end-to-end pipeline tests here.

tests/slurm/conftest.py owns the clusters (install in the background, start, share across sessions, stop
and check for leftovers); it is loaded here under its own module name and its fixtures and hooks are
re-exported, so these tests run alone (`pytest tests/e2e`) or together with tests/slurm.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SLURM_TESTS = Path(__file__).resolve().parents[1] / "slurm"
if str(_SLURM_TESTS) not in sys.path:
    sys.path.insert(0, str(_SLURM_TESTS))  # slurm_testlib, as tests/slurm/conftest.py imports it

_spec = importlib.util.spec_from_file_location("_slurm_fixtures_for_e2e", _SLURM_TESTS / "conftest.py")
_mod = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _mod
_spec.loader.exec_module(_mod)

slurm_cluster = _mod.slurm_cluster
slurm_cluster_2411 = _mod.slurm_cluster_2411
slurm_2205_installed = _mod.slurm_2205_installed
pytest_collection_finish = _mod.pytest_collection_finish
pytest_terminal_summary = _mod.pytest_terminal_summary
