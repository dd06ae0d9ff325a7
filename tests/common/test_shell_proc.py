"""common/lib additions for the streaming entry script: job key and folder, URL ordering, HTTP check without
curl, process groups (start/stop), the failure watcher; and the entry script's own fast failure paths."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "common" / "lib"
ENTRY = REPO / "common" / "eagle3" / "train_eagle_streaming.sh"


def bash(snippet: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `snippet` in bash with the whole library sourced and strict mode on."""
    libs = "".join(f"source {LIB}/{n}.sh\n" for n in ("log", "python", "rendezvous", "plan", "proc"))
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{libs}{snippet}\n"],
        check=False,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize(
    "env,key",
    [
        ({"SLURM_JOB_ID": "42"}, "42"),
        ({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "0"}, "42"),
        ({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"}, "42.r2"),
        ({"MODELOPT_RUN_ID": "r1", "MODELOPT_TASK": "task_1"}, "local-r1-task_1"),
    ],
)
def test_job_key_and_dir(env, key, tmp_path):
    r = bash("rdv_job_key; rdv_job_dir", dict(env, MODELOPT_SCRATCH=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [key, f"{tmp_path}/rendezvous/{key}"]


def test_job_dir_needs_the_scratch_folder():
    r = bash("rdv_job_dir", {"SLURM_JOB_ID": "42"})
    assert r.returncode != 0 and "MODELOPT_SCRATCH" in r.stderr


def test_ordered_urls_put_the_preferred_server_first(tmp_path):
    for i in (0, 2, 4):
        (tmp_path / f"server.{i}").write_text(f"http://10.0.0.{i}:8765\n")
    r = bash(f'rdv_ordered_urls "{tmp_path}" 2 0 2 4; rdv_ordered_urls "{tmp_path}" "" 0 2 4')
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        "http://10.0.0.2:8765,http://10.0.0.0:8765,http://10.0.0.4:8765",
        "http://10.0.0.0:8765,http://10.0.0.2:8765,http://10.0.0.4:8765",
    ]
    r = bash(f'rdv_ordered_urls "{tmp_path}" 0 0 6')
    assert r.returncode != 0 and f"{tmp_path}/server.6" in r.stderr


@pytest.fixture()
def http_url():
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_check_works_without_curl(http_url, tmp_path):
    # A PATH with python3 and the shell tools but no curl, as in a minimal chroot.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python3", "bash", "sleep", "mkdir", "dirname", "mktemp", "mv", "head", "date"):
        src = subprocess.run(
            ["bash", "-c", f"command -v {tool}"], check=False, capture_output=True, text=True
        ).stdout.strip()
        (bin_dir / tool).symlink_to(src)
    env = {"PATH": str(bin_dir)}
    r = bash(
        f'command -v curl || echo no-curl; rdv_http_ok "{http_url}/" && echo up; '
        f'rdv_http_ok "http://127.0.0.1:9/" || echo down',
        env,
    )
    assert r.stdout.split() == ["no-curl", "up", "down"], r.stderr


def test_stop_group_stops_every_process_of_the_group(tmp_path):
    pids = tmp_path / "pids"
    r = bash(
        f"proc_start_group - bash -c 'sleep 300 & echo $! > {pids}; sleep 300'\n"
        "leader=$PROC_PID; sleep 1; proc_group_alive $leader && echo alive\n"
        "proc_stop_group $leader 5; proc_group_alive $leader || echo stopped; echo $leader"
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[:2] == ["alive", "stopped"]
    assert _gone(int(lines[2])) and _gone(int(pids.read_text()))


def test_stop_group_also_stops_children_that_left_the_group(tmp_path):
    # torchrun starts each rank with start_new_session: stopping only the launcher's group would orphan it.
    pids = tmp_path / "pids"
    r = bash(
        f"proc_start_group - bash -c 'setsid sleep 300 & echo $! > {pids}; sleep 300'\n"
        "sleep 1; proc_tree_groups $PROC_PID | sort; echo ---; proc_stop_group $PROC_PID 5; echo stopped"
    )
    assert r.returncode == 0, r.stderr
    child = int(pids.read_text())
    groups = r.stdout.split("---")[0].split()
    assert str(child) in groups and len(groups) == 2
    assert _gone(child)


def test_stop_group_kills_what_ignores_sigterm():
    start = time.monotonic()
    r = bash(
        "proc_start_group - bash -c 'trap \"\" TERM; sleep 300'\n"
        "sleep 0.5; proc_stop_group $PROC_PID 1; proc_group_alive $PROC_PID || echo stopped"
    )
    assert r.stdout.split() == ["stopped"], r.stderr
    assert "SIGKILL" in r.stderr
    assert time.monotonic() - start < 20


def test_wait_exit_reports_the_code():
    r = bash(
        "bash -c 'exit 7' & proc_wait_exit $!; echo $PROC_RC; sleep 0.1 & proc_wait_exit $!; echo $PROC_RC"
    )
    assert r.stdout.split() == ["7", "0"], r.stderr


def test_watcher_stops_the_group_when_the_job_fails(tmp_path):
    start = time.monotonic()
    r = bash(
        f"RDV_POLL_S=0.2; proc_start_group - sleep 300; pg=$PROC_PID\n"
        f'proc_watch "{tmp_path}" $pg\n'
        f'sleep 1; rdv_mark_failed "{tmp_path}" "trainer 3 died"\n'
        f"proc_wait_exit $pg; echo rc=$PROC_RC; wait $PROC_WATCH_PID; echo watcher-done",
        {"SLURM_NODEID": "3"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["rc=143", "watcher-done"]
    assert "the job failed (node 3: trainer 3 died)" in r.stderr
    assert time.monotonic() - start < 20


def test_watcher_guard_death_fails_the_job(tmp_path):
    r = bash(
        f"RDV_POLL_S=0.2; sleep 1 & guard=$!\n"
        f"proc_start_group - sleep 300; pg=$PROC_PID\n"
        f'proc_watch "{tmp_path}" $pg $guard "the vllm server on node 0"\n'
        f"proc_wait_exit $pg; echo rc=$PROC_RC",
        {"SLURM_NODEID": "0"},
    )
    assert r.stdout.split() == ["rc=143"], r.stderr
    reason = (tmp_path / "failed").read_text()
    assert reason.startswith("node 0: the vllm server on node 0 (pid ") and reason.strip().endswith("exited")


def test_port_checks():
    r = bash("p=$(proc_free_port); proc_port_free $p && echo free")
    assert r.stdout.split() == ["free"], r.stderr


def test_wait_healthy_returns_once_the_server_answers(http_url):
    r = bash(f'proc_start_group - sleep 30; proc_wait_healthy "$PROC_PID" "{http_url}/" 20 "the server" '
             f'&& echo healthy; proc_stop_group "$PROC_PID" 1')  # fmt: skip
    assert r.stdout.split() == ["healthy"], r.stderr


def test_wait_healthy_stops_at_once_when_the_server_died():
    start = time.monotonic()
    r = bash('proc_start_group - bash -c "exit 3"; '
             'proc_wait_healthy "$PROC_PID" "http://127.0.0.1:9/" 60 "the test server" || echo "$PROC_WAIT_ERR"',
             {"RDV_POLL_S": "0.1"})  # fmt: skip
    assert r.stdout.strip() == "the test server exited with code 3 before answering http://127.0.0.1:9/", r.stderr
    assert time.monotonic() - start < 30


def test_wait_healthy_is_bounded_and_says_what_it_waited_for():
    r = bash('proc_start_group - sleep 30; '
             'proc_wait_healthy "$PROC_PID" "http://127.0.0.1:9/health" 1 "vLLM" || echo "$PROC_WAIT_ERR"; '
             'proc_stop_group "$PROC_PID" 1', {"RDV_POLL_S": "0.1"})  # fmt: skip
    assert r.stdout.strip() == "vLLM did not answer http://127.0.0.1:9/health within 1s", r.stderr


def test_wait_healthy_gives_up_when_the_job_failed(tmp_path):
    r = bash(f'RDV_DIR="{tmp_path}"; rdv_mark_failed "$RDV_DIR" "trainer died"; proc_start_group - sleep 30; '
             'proc_wait_healthy "$PROC_PID" "http://127.0.0.1:9/" 60 "vLLM" || echo "$PROC_WAIT_ERR"; '
             'proc_stop_group "$PROC_PID" 1', {"RDV_POLL_S": "0.1"})  # fmt: skip
    assert "the job ended (node 0: trainer died) while waiting for vLLM" in r.stdout, r.stderr


# ------------------------------------------------------------------------------------------ entry script


def _fake_target(tmp_path) -> str:
    """A target folder with only a config.json: enough for the entry script's job_info (layer count), so
    these tests never depend on a built tiny target (a fresh clone has none)."""
    target = tmp_path / "target"
    target.mkdir(exist_ok=True)
    (target / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 128}')
    return f"model.path={target}"


def _entry(args, tmp_path, **env):
    if args and args[0] == "--config":
        args = [*args, _fake_target(tmp_path)]
    full = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "MODELOPT_REPO": str(REPO),
        "MODELOPT_SCRATCH": str(tmp_path),
        "SLURM_JOB_ID": "7",
        "SERVE_NODES": "1",
        "SERVE_NODE_IDS": "0",
        "TRAIN_NODE_IDS": "1,2",
        "TRAINER_SERVER_MAP": "1:0,2:0",
        "SLURM_NODEID": "1",
        "RDV_POLL_S": "0.2",
    }
    full.update(env)
    return subprocess.run(
        ["bash", str(ENTRY), *args],
        check=False,
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
        cwd=REPO,
    )


def test_entry_usage_error():
    r = subprocess.run(["bash", str(ENTRY)], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


def test_entry_bad_recipe_marks_the_job_failed(tmp_path):
    r = _entry(["--config", "recipes/eagle3/tiny.yaml", "training.lr=-1"], tmp_path)
    assert r.returncode != 0
    assert "training.lr" in r.stderr
    reason = (tmp_path / "rendezvous" / "7" / "failed").read_text()
    assert reason.startswith("node 1: the recipe, its overrides or EAGLE_CAPTURE_IDS are invalid")


@pytest.mark.parametrize(
    "ids,message",
    [
        ("[1,2,3]", "must end with the target's layer count 4"),
        ("4", "needs the drafter's layer ids before the last id"),
        ("1,9,4", "layer ids [9] outside [0, 4]"),
        ("1,x", "expected comma-separated integers"),
    ],
)
def test_entry_capture_ids_are_checked_by_python_not_bash(tmp_path, ids, message):
    # The script forwards EAGLE_CAPTURE_IDS to job_info (targets/layers decides); its line reaches the log.
    r = _entry(["--config", "recipes/eagle3/tiny.yaml"], tmp_path, EAGLE_CAPTURE_IDS=ids)
    assert r.returncode != 0
    assert f"error: --capture-ids '{ids}': " in r.stderr and message in r.stderr, r.stderr
    reason = (tmp_path / "rendezvous" / "7" / "failed").read_text()
    assert "EAGLE_CAPTURE_IDS are invalid" in reason


def test_entry_trainer_stops_when_another_node_failed(tmp_path):
    rdv = tmp_path / "rendezvous" / "7"
    rdv.mkdir(parents=True)
    (rdv / "failed").write_text("node 0: the vllm server on node 0 exited with code 1\n")
    start = time.monotonic()
    r = _entry(["--config", "recipes/eagle3/tiny.yaml"], tmp_path)
    assert r.returncode != 0
    assert "the job failed (node 0: the vllm server on node 0 exited with code 1)" in r.stderr
    assert time.monotonic() - start < 60


def test_entry_trainer_wait_for_servers_is_bounded_and_names_them(tmp_path):
    r = _entry(["--config", "recipes/eagle3/tiny.yaml"], tmp_path, SERVE_WAIT_S="1")
    assert r.returncode != 0
    assert "hidden-state servers of nodes 0" in r.stderr and f"{tmp_path}/rendezvous/7/server.0" in r.stderr
    assert (
        "no address from some hidden-state servers" in (tmp_path / "rendezvous" / "7" / "failed").read_text()
    )


_FAKE_PY = """#!/usr/bin/env bash
# The project's interpreter, except that serve_target is a stand-in HTTP server answering 200 to every GET
# (so the serve node's restart logic is tested without a model).
if [[ "$1" == -m && "$2" == modelopt_ext.serve_target ]]; then
  port=""
  while (($#)); do [[ "$1" == --port ]] && port="$2"; shift; done
  exec {py} -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
' "$port"
fi
exec {py} "$@"
"""


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _kill_server(rdv: Path) -> int:
    import signal

    pid = int((rdv / "server.0.pid").read_text())
    os.killpg(pid, signal.SIGKILL)
    return pid


@pytest.mark.parametrize("other_down", [False, True])
def test_entry_serve_node_restarts_its_server_then_gives_it_up(tmp_path, other_down):
    """Serve node 0 of 2: a killed server is restarted (each restart logged, address re-published) up to
    SERVE_RESTARTS times; then the node gives it up (server.0.down) and keeps watching while the other serve
    node still serves, or fails the job when no server is left."""
    import socket
    import sys

    fake = tmp_path / "python"
    fake.write_text(_FAKE_PY.format(py=sys.executable))
    fake.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rdv = tmp_path / "rendezvous" / "7"
    if other_down:
        rdv.mkdir(parents=True)
        (rdv / "server.1.down").write_text("exited with code 9\n")
    env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "MODELOPT_REPO": str(REPO),
        "MODELOPT_SCRATCH": str(tmp_path), "SLURM_JOB_ID": "7", "SLURM_NNODES": "3", "SERVE_NODES": "2",
        "SERVE_NODE_IDS": "0,1", "TRAIN_NODE_IDS": "2", "TRAINER_SERVER_MAP": "2:0", "SLURM_NODEID": "0",
        "RDV_POLL_S": "0.2", "SERVE_ENGINE": "target", "SERVE_PORT": str(port), "SERVE_ADVERTISE_IP": "127.0.0.1",
        "SERVE_RESTARTS": "2", "SERVE_RESTART_BACKOFF_S": "0", "MODELOPT_PYTHON": str(fake),
    }  # fmt: skip
    proc = subprocess.Popen(
        ["bash", str(ENTRY), "--config", "recipes/eagle3/tiny.yaml", _fake_target(tmp_path)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait(lambda: (rdv / "server.0").is_file(), 60, "the server's address")
        url = (rdv / "server.0").read_text().strip()
        assert url == f"http://127.0.0.1:{port}"
        for n in (1, 2):
            old = _kill_server(rdv)
            _wait(lambda n=n: (rdv / "server.0.restarts").is_file()
                  and (rdv / "server.0.restarts").read_text().strip() == str(n), 60, f"restart {n}")  # fmt: skip
            assert int((rdv / "server.0.pid").read_text()) != old
            assert (rdv / "server.0").read_text().strip() == url
        _kill_server(rdv)
        _wait(lambda: (rdv / "server.0.down").is_file(), 60, "the server given up")
        if other_down:
            proc.wait(60)
        else:
            time.sleep(1)
            assert proc.poll() is None and not (rdv / "failed").exists(), "the node must keep watching"
            (rdv / "done").write_text("now\n")
            proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        _out, err = proc.communicate()
    assert "[node 0] outage: the target hidden-state server on node 0 exited with code 137" in err
    assert "restart 1/2 of the target server on node 0 in 0s" in err and "restart 2/2" in err
    assert err.count("server restarted: http://127.0.0.1") == 2
    if other_down:
        assert proc.returncode != 0
        reason = (rdv / "failed").read_text()
        assert "no hidden-state server is left" in reason, reason
    else:
        assert proc.returncode == 0, err[-3000:]
        assert "stays down after 2 restart(s); the job continues on the other servers" in err
