"""Shared pytest setup."""

import os
import sys

import pytest

# Machines of this kind export PYTHONDONTWRITEBYTECODE=1. The suite starts hundreds of Python processes
# (CLIs, launcher runs, node tasks, DataLoader workers, servers); without cached bytecode each one
# recompiles torch and transformers on import (seconds of CPU each on 2 cores). Let this session and its
# child processes write and reuse .pyc files.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only contend (measured 20x slower).

    Only where the test has torch loaded already: launcher and shell tests never import it.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
