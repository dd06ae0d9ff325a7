"""Shared setup for the trainer tests.

The stand-in parts live next to these tests (importable as `standin`). Torch runs one intra-op thread here:
the models are tiny, and on a small machine shared with other test processes OpenMP threads spin-wait
on each other (measured: ~10x slower steps with 2 threads on 2 busy cores).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
