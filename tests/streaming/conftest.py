"""Shared fixtures of the real-vLLM streaming tests: ONE pair of hidden-state servers per session.

A vLLM CPU server takes 1-5 minutes to start on a loaded 2-core machine, so every module that needs real
servers shares the same two. Tests that kill a server (the failover tests) leave it dead; the next test that
asks for `servers` gets it restarted (on a fresh port) by `VllmPair.ensure_live`, so each test starts with
two live servers and only a kill costs a restart.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from modelopt_ext.util.proc import free_port

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO / "recipes" / "eagle3" / "tiny.yaml"
STARTUP_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def tiny_target() -> Path:
    """The tiny Llama target (built once, cached across sessions)."""
    from modelopt_ext.targets.tiny import build_tiny_target

    cache = Path(os.environ.get("MODELOPT_EXT_TEST_CACHE", REPO / ".cache"))
    return build_tiny_target(cache / "tiny-target")


@pytest.fixture(scope="session")
def aux_ids() -> list[int]:
    """The tiny recipe's aux layers (vLLM numbering); the servers capture them plus L."""
    from modelopt_ext.config.overrides import load_yaml_file

    return list(load_yaml_file(str(TINY_RECIPE))["model"]["aux_layer_ids"])


@dataclass
class VllmPair:
    """Two real vLLM hidden-state servers sharing one storage root; `handles` is updated in place."""

    target: Path
    root: Path
    logs: Path
    capture: list[int]
    python: str
    handles: list = field(default_factory=lambda: [None, None])
    starts: int = 0

    def _start(self, i: int, errors: list[str]) -> None:
        from modelopt_ext.supply.vllm.server import start_hidden_states_server

        self.starts += 1
        try:
            self.handles[i] = start_hidden_states_server(
                str(self.target), shared_storage=self.root, capture_ids=self.capture, port=free_port(),
                dtype="float32", max_model_len=512, python=self.python,
                log_path=self.logs / f"vllm_{i}_{self.starts}.log", startup_timeout=STARTUP_TIMEOUT_S,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a starter thread must hand back any failure
            errors.append(f"server {i}: {e}")

    def ensure_live(self) -> None:
        """(Re)start every server that is not running (concurrently); fail the test if one cannot start."""
        dead = [i for i, h in enumerate(self.handles) if h is None or not h.alive()]
        if not dead:
            return
        for i in dead:
            if self.handles[i] is not None:
                self.handles[i].stop(timeout=5)  # reap the group of a killed server
                self.handles[i] = None
        errors: list[str] = []
        t0 = time.monotonic()
        threads = [threading.Thread(target=self._start, args=(i, errors)) for i in dead]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=STARTUP_TIMEOUT_S + 60)
        assert not errors and all(self.handles), f"vLLM servers failed to start: {errors}"
        print(f"\nvLLM server(s) {dead} up in {time.monotonic() - t0:.0f} s: {[h.url for h in self.handles]}")

    def stop(self) -> None:
        """Stop both servers (process groups)."""
        for h in self.handles:
            if h is not None:
                h.stop()


@pytest.fixture(scope="session")
def vllm_pair(tiny_target, aux_ids, tmp_path_factory):
    """The session's two vLLM servers (started on first use, stopped at session end)."""
    from modelopt_ext.deploy.vllm_env import ensure_vllm_env
    from modelopt_ext.targets.layers import capture_layer_ids, target_num_layers

    pair = VllmPair(
        target=tiny_target,
        root=tmp_path_factory.mktemp("shared"),
        logs=tmp_path_factory.mktemp("logs"),
        capture=capture_layer_ids(target_num_layers(tiny_target), aux_ids),
        python=str(ensure_vllm_env()),
    )
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture
def servers(vllm_pair):
    """(storage root, [handle A, handle B]) with both servers running at the start of the test."""
    vllm_pair.ensure_live()
    return vllm_pair.root, vllm_pair.handles
