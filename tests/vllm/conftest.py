"""Fixtures for the real-vLLM tests: vLLM's own env, the tiny target, one hidden-state server per session.

The env is created by `ensure_vllm_env()` exactly as users get it (CI is a fresh machine); if that is
impossible the tests FAIL with the reason, they never skip. The server is started ONCE (per module, so it is gone before other engines start) through
the real CLI (`python -m modelopt_ext.serve_hidden_states`), since a start costs 60-110 s on 2 cores.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelopt_ext.util.proc import free_port, signal_group, stop_group

REPO = Path(__file__).resolve().parents[2]
CAPTURE_IDS = [0, 1, 2, 3, 4]  # every layer of the 4-layer tiny target, 4 = L (pre-final-norm)
STARTUP_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """vLLM's own interpreter, created on first use (a failure is a test failure, never a skip)."""
    from modelopt_ext.deploy.vllm_env import VllmEnvError, ensure_vllm_env

    t0 = time.monotonic()
    try:
        py = ensure_vllm_env()
    except VllmEnvError as e:
        pytest.fail(f"cannot create vLLM's environment: {e}", pytrace=False)
    print(f"\nvLLM env ready in {time.monotonic() - t0:.1f} s: {py}")
    return py


@pytest.fixture(scope="session")
def tiny_target() -> Path:
    """The shared tiny Llama target (head_dim 64), built once and cached across sessions."""
    from modelopt_ext.targets.tiny import build_tiny_target

    cache = Path(os.environ.get("MODELOPT_EXT_TEST_CACHE", REPO / ".cache"))
    return build_tiny_target(cache / "tiny-target")


@dataclass
class RunningServer:
    url: str
    model_id: str
    storage: Path
    cli: subprocess.Popen
    vllm_pid: int
    log: Path
    startup_s: float
    capture_ids: list[int]


def _read_line(proc: subprocess.Popen, stream, deadline: float) -> str:
    """One line from a child's pipe, waiting at most until `deadline` (and not past the child's exit)."""
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no line from the server CLI in time")
        ready, _, _ = select.select([stream], [], [], min(left, 1.0))
        if ready:
            ch = os.read(stream.fileno(), 1)
            if not ch:
                break
            buf += ch
        elif proc.poll() is not None:
            break
    return buf.decode().strip()


@pytest.fixture(scope="module")
def hs_server(vllm_python, tiny_target, tmp_path_factory) -> RunningServer:
    """A real vLLM hidden-state server on the tiny target (fp32), started through the CLI."""
    from modelopt_ext.supply.vllm.server import models_ready

    storage = tmp_path_factory.mktemp("shared_storage")
    log = tmp_path_factory.mktemp("logs") / "vllm_server.log"
    port = free_port()
    env = dict(
        os.environ, VLLM_CPU_KVCACHE_SPACE="1", MODELOPT_EXT_VLLM_ENV=str(Path(vllm_python).parents[1])
    )
    cmd = [
        sys.executable, "-m", "modelopt_ext.serve_hidden_states", "--engine", "vllm", "--model", str(tiny_target),
        "--capture-ids", ",".join(map(str, CAPTURE_IDS)), "--shared-storage", str(storage), "--port", str(port),
        "--dtype", "float32", "--max-model-len", "1024", "--log", str(log),
        "--startup-timeout", str(STARTUP_TIMEOUT_S),
    ]  # fmt: skip
    t0 = time.monotonic()
    cli = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    vllm_pid = None
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S + 60
        info = ""
        while "vLLM pid " not in info and cli.poll() is None and time.monotonic() < deadline:
            info = _read_line(cli, cli.stderr, deadline)  # "vLLM pid N; capture ids [...]; log ..."
        url = _read_line(cli, cli.stdout, deadline)
        if not url.startswith("http://"):
            tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
            pytest.fail(
                f"server CLI did not print a URL (got {url!r}, {info!r}); log tail:\n" + "\n".join(tail),
                pytrace=False,
            )
        vllm_pid = int(info.split("vLLM pid ")[1].split(";")[0])  # the CLI started it in its own group
        model_id = models_ready(url)
        assert model_id, f"{url}/v1/models stopped answering"
        server = RunningServer(url, model_id, storage, cli, vllm_pid, log, time.monotonic() - t0, CAPTURE_IDS)
        print(f"\nvLLM hidden-state server up in {server.startup_s:.0f} s at {url}")
        yield server
    finally:
        stop_group(cli, signal.SIGTERM, 60)  # the CLI stops its vLLM group on SIGTERM
        if vllm_pid:  # whatever is left of vLLM's group
            signal_group(vllm_pid, signal.SIGKILL)
