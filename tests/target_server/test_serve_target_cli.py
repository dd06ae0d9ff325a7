"""serve_target as a real process: parity with colocated through the wire and gloo, signals, auth, bad args."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from modelopt_ext.supply.target_server.process import ServeTargetStartError, start_serve_target
from modelopt_ext.supply.target_server.source import RemoteTargetClient, RemoteTargetError

from .conftest import AUX, HIDDEN, LAYERS, VOCAB, assert_same_supervision, make_batch

EXPECT = {
    "num_layers": LAYERS,
    "hidden_size": HIDDEN,
    "vocab_size": VOCAB,
    "aux_layer_ids": AUX,
    "dtype": "float32",
}
REPO = Path(__file__).resolve().parents[2]


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "modelopt_ext.serve_target", *args]


class Served:
    """A serve_target process started for a test; stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, model_dir: Path, tmp: Path, *extra: str):
        self.log = tmp / "serve_target.log"
        env = {**os.environ, "MODELOPT_EXT_NCCL_PORT": "0"}
        # Same CPU thread count as this process: reductions then split the same way (bit-for-bit parity).
        args = ["--target", str(model_dir), "--port", "0", "--aux-layer-ids", ",".join(map(str, AUX)),
                "--device", "cpu", "--threads", str(torch.get_num_threads()), *extra]  # fmt: skip
        self.proc, self.url = start_serve_target(args, tmp, timeout_s=120, env=env, cwd=REPO)

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """One server process for the module's tests (starting one costs seconds); the last test stops it."""
    s = Served(tiny_model_dir, tmp_path_factory.mktemp("served"))
    yield s
    s.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("use_data_plane", [False, True], ids=["wire", "gloo"])
def test_serve_target_process_equals_colocated_bit_for_bit(served, colocated, use_data_plane):
    with RemoteTargetClient(served.url, use_data_plane=use_data_plane) as client:
        client.model_info(expect=EXPECT)
        for seed in range(3):
            batch = make_batch(b=2 + seed, t=12 + 7 * seed, seed=seed)
            assert_same_supervision(client(batch), colocated(batch))
        assert client.transport == ("data_plane" if use_data_plane else "wire")
        assert client.last_meta["transport"] == client.transport


_GHOST = textwrap.dedent(
    """
    import sys, time, torch
    from modelopt_ext.supply.target_server.source import RemoteTargetClient
    c = RemoteTargetClient(sys.argv[1], use_data_plane=True)
    c._ensure_data_plane()
    assert c.transport == "data_plane", c.transport
    ids = torch.randint(0, 100, (4, 64))
    m = torch.ones(4, 64, dtype=torch.bool)
    c._post("generate", {"transport": "data_plane"}, {"input_ids": ids, "attention_mask": m, "loss_mask": m})
    print("ghost ready", flush=True)
    time.sleep(600)  # never receives; killed by the test
    """
)


@pytest.mark.e2e
def test_two_clients_and_a_killed_client_do_not_stop_the_server(served, colocated):
    ghost = subprocess.Popen(
        [sys.executable, "-c", _GHOST, served.url], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert ghost.stdout.readline().strip() == "ghost ready"
    finally:
        ghost.kill()
        ghost.wait(10)
    errors = []

    def work(use_dp: bool, seed: int) -> None:
        try:
            with RemoteTargetClient(served.url, use_data_plane=use_dp) as c:
                for i in range(3):
                    batch = make_batch(seed=seed + i)
                    assert_same_supervision(c(batch), colocated(batch))
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(dp, 10 * k)) for k, dp in enumerate((True, True, False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert served.proc.poll() is None
    assert httpx.get(f"{served.url}/health", timeout=10).json()["status"] == "ok"


@pytest.mark.e2e
def test_sigterm_stops_the_server_cleanly(served):
    assert served.proc.poll() is None
    t0 = time.monotonic()
    assert served.stop() == 0
    assert time.monotonic() - t0 < 20
    assert "serve_target: stopped" in served.log.read_text()


@pytest.mark.e2e
def test_token_file_and_shutdown_endpoint(tiny_model_dir, tmp_path, token_file):
    s = Served(tiny_model_dir, tmp_path, "--token-file", str(token_file))
    try:
        r = httpx.post(f"{s.url}/model_info", timeout=10)
        assert r.status_code == 401 and r.json() == {"error": "missing or wrong bearer token"}
        with pytest.raises(RemoteTargetError, match="401"):
            RemoteTargetClient(s.url).model_info()
        client = RemoteTargetClient(s.url, token_file=token_file)
        assert client.model_info(expect=EXPECT)["model"] == str(tiny_model_dir)
        assert httpx.post(f"{s.url}/shutdown", timeout=10).status_code == 401
        r = httpx.post(f"{s.url}/shutdown", headers={"Authorization": "Bearer s3cret-token"}, timeout=10)
        assert r.json() == {"shutting_down": True}
        assert s.proc.wait(20) == 0
    finally:
        s.stop()


def _run_bad(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), check=False, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    open_token = tmp_path / "token"
    open_token.write_text("abc")
    open_token.chmod(0o644)
    cases = [
        (("--target", str(tmp_path / "missing")), f"--target {str(tmp_path / 'missing')!r}: no such folder"),
        (("--target", "outputs/tiny/targte"), "--target 'outputs/tiny/targte': no such folder"),
        (("--target", str(tmp_path)), "a folder without config.json"),
        (("--target", str(tmp_path), "--token-file", str(open_token)), "readable by other users"),
        (("--target", str(tmp_path), "--token-file", str(tmp_path / "nope")), "cannot be read"),
        (("--target", str(tmp_path), "--port", "70000"), "not a port number"),
    ]
    for args, fragment in cases:
        r = _run_bad(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith("serve_target: "), r.stderr


@pytest.mark.e2e
def test_bad_aux_layer_ids_exit_2(tiny_model_dir):
    r = _run_bad("--target", str(tiny_model_dir), "--aux-layer-ids", "1,99", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "serve_target: --aux-layer-ids: layer ids [99] outside [0, 4] for a 4-layer target (vLLM numbering)"
    )


def test_a_server_that_cannot_start_is_one_error_naming_its_log(tmp_path):
    """start_serve_target (the one way benchmarks and tests start serve_target) does not wait out its
    timeout for a server that already exited, and names the reason and the log."""
    t0 = time.monotonic()
    with pytest.raises(ServeTargetStartError) as e:
        start_serve_target(["--target", str(tmp_path / "no-such-model")], tmp_path / "w", timeout_s=120)
    first, _, tail = str(e.value).partition("\n")
    assert first == f"serve_target exited with code 2 before serving (log {tmp_path / 'w' / 'serve_target.log'})"
    assert "--target" in tail and time.monotonic() - t0 < 60
