"""Shared setup for the trainer tests.

The stand-in parts live next to these tests (importable as `standin`). Torch runs one intra-op thread here:
the models are tiny, and on a small machine shared with other test processes OpenMP threads spin-wait
on each other (measured: ~10x slower steps with 2 threads on 2 busy cores).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _no_training_plot(request, monkeypatch):
    """The fast tier skips drawing telemetry's training.png (matplotlib: ~95% of a 6-step stand-in run);
    nothing here checks the plot, and the e2e tests keep it."""
    if request.node.get_closest_marker("e2e") is not None:
        return
    try:
        from modelopt_ext.telemetry import plot
    except ImportError:
        return
    monkeypatch.setattr(plot, "plot_training", lambda *a, **k: None)
