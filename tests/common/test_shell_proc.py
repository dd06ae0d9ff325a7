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
    libs = "".join(f"source {LIB}/{n}.sh\n" for n in ("log", "rendezvous", "plan", "proc"))
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


@pytest.mark.parametrize(
    "csv,k,expected",
    [
        ("a,b,c", 0, "a,b,c"),
        ("a,b,c", 1, "c,a,b"),
        ("a,b,c", 5, "b,c,a"),
        ("s2,s0", 1, "s0,s2"),
        ("x", 3, "x"),
    ],
)
def test_rotate_puts_the_first_item_at_index_k(csv, k, expected):
    r = bash(f"rdv_rotate_csv {csv} {k}")
    assert r.stdout.strip() == expected, r.stderr


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
    assert reason.startswith("node 1: the recipe or its overrides are invalid")


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
