"""`python -m modelopt_ext.serve_hidden_states` as a real process with real signals (fast: a stand-in server).

vLLM itself is replaced by a small executable standing where vLLM's python would be
(`MODELOPT_EXT_VLLM_PYTHON`): it is started exactly as vLLM is (own process group, same argv) and answers
`GET /v1/models` on the port it is given. The real-vLLM path is covered by tests/vllm/conftest.py's server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelopt_ext.util.proc import free_port

REPO = Path(__file__).resolve().parents[2]

_STANDIN = """#!{python}
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
open({pidfile!r}, "w").write(str(os.getpid()))
if {never_ready!r}:
    time.sleep(600)
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        body = json.dumps({{"data": [{{"id": "standin"}}]}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _target(tmp_path: Path, layers: int = 6) -> Path:
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return target


def _standin(tmp_path: Path, never_ready: bool = False) -> tuple[Path, Path]:
    pidfile = tmp_path / "standin.pid"
    exe = tmp_path / "vllm-python"
    exe.write_text(_STANDIN.format(python=sys.executable, pidfile=str(pidfile), never_ready=never_ready))
    exe.chmod(0o755)
    return exe, pidfile


def _cli(tmp_path: Path, exe: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MODELOPT_EXT_VLLM_PYTHON": str(exe), "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "modelopt_ext.serve_hidden_states", "--model", str(_target(tmp_path)),
        "--shared-storage", str(tmp_path / "hs"), "--flavor", "cpu", "--port", str(free_port()),
        "--startup-timeout", "120", *args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ("1,2,9", "layer ids [9] outside [0, 6] for a 6-layer target (vLLM numbering)"),
        ("1,2,5", "[1, 2, 5] must end with the target's layer count 6 (the last layer, pre-final-norm), after the drafter's layer ids"),
        ("1,1,6", "layer ids [1, 1, 6] must be distinct"),
    ],
)  # fmt: skip
def test_capture_ids_outside_the_target_are_refused_before_vllm_starts(tmp_path, ids, message):
    exe, pidfile = _standin(tmp_path)
    cli = _cli(tmp_path, exe, "--capture-ids", ids)
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 2, err
    assert err.strip().splitlines() == [f"error: --capture-ids/--aux-layer-ids: {message}"]
    assert not pidfile.exists() and out == ""  # vLLM never started


def _signal_once_ready(cli: subprocess.Popen, ready, pidfile: Path, sig: int) -> tuple[str, str, int, float]:
    """Wait for `ready()`, send `sig` to the CLI; (stdout, stderr, the stand-in's pid, seconds the CLI took to
    exit). The CLI never outlives the test."""
    try:
        ready()
        server_pid = int(pidfile.read_text())
        assert _alive(server_pid)
        t0 = time.monotonic()
        cli.send_signal(sig)
        out, err = cli.communicate(timeout=60)
        return out, err, server_pid, time.monotonic() - t0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_running_server_cleanly(tmp_path, sig, code):
    exe, pidfile = _standin(tmp_path)
    cli = _cli(tmp_path, exe, "--capture-ids", "1,3,6")

    def ready():
        url = cli.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), cli.stderr.read() if cli.poll() is not None else url

    _, err, server_pid, took = _signal_once_ready(cli, ready, pidfile, sig)
    assert cli.returncode == code, err
    assert "Traceback" not in err and "TimeoutExpired" not in err, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("serve_hidden_states: vLLM pid ") and "capture ids [1, 3, 6]" in lines[0]
    assert lines[1].startswith(f"serve_hidden_states: {sig.name}: stopping vLLM"), err
    assert lines[2:] == ["serve_hidden_states: vLLM stopped (exit code -15)"], err  # it got SIGTERM
    _wait_for(lambda: not _alive(server_pid), 10, "the stand-in server to be gone")
    assert took < 30  # it stopped on SIGTERM, not after the SIGKILL grace period


def test_sigterm_during_startup_stops_the_starting_server(tmp_path):
    exe, pidfile = _standin(tmp_path, never_ready=True)
    cli = _cli(tmp_path, exe)

    def ready():
        _wait_for(lambda: pidfile.exists() and pidfile.read_text(), 60, "the stand-in server to start")

    out, err, server_pid, _ = _signal_once_ready(cli, ready, pidfile, signal.SIGTERM)
    assert cli.returncode == 143, err
    assert err.strip().splitlines() == ["serve_hidden_states: SIGTERM: stopped during startup"], err
    assert out == ""
    _wait_for(lambda: not _alive(server_pid), 10, "the stand-in server to be gone")
