"""The node entry scripts' shell library (common/lib): atomic publish, bounded waits, markers, role plan."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "common" / "lib"


def bash(snippet: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `snippet` in bash with the library sourced and strict mode on."""
    libs = "".join(f"source {LIB}/{n}.sh\n" for n in ("log", "python", "rendezvous", "plan"))
    script = f"set -euo pipefail\n{libs}{snippet}\n"
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", "-c", script], check=False, capture_output=True, text=True, env=full_env, timeout=timeout
    )


def test_publish_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "rdv" / "serve_addr.0"
    seen_partial = []
    stop = threading.Event()

    def reader():
        # A reader polling during many publishes must only ever see complete lines.
        while not stop.is_set():
            if target.exists():
                text = target.read_text()
                if text and not text.endswith("\n"):
                    seen_partial.append(text)

    t = threading.Thread(target=reader)
    t.start()
    try:
        r = bash(f'for i in $(seq 1 200); do rdv_publish "{target}" "http://10.0.0.$i:8765"; done')
    finally:
        stop.set()
        t.join()
    assert r.returncode == 0, r.stderr
    assert target.read_text() == "http://10.0.0.200:8765\n"
    assert seen_partial == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["serve_addr.0"]


def test_wait_files_times_out_naming_the_missing_ones(tmp_path):
    (tmp_path / "a").touch()
    start = time.monotonic()
    r = bash(f'RDV_POLL_S=0.1 rdv_wait_files 1 "server addresses" "{tmp_path}/a" "{tmp_path}/b"')
    assert r.returncode == 1
    assert time.monotonic() - start < 10
    assert "server addresses" in r.stderr and f"{tmp_path}/b" in r.stderr and f"{tmp_path}/a" not in r.stderr


def test_wait_files_returns_when_files_appear(tmp_path):
    later = tmp_path / "late"
    timer = threading.Timer(0.5, later.touch)
    timer.start()
    r = bash(f'RDV_POLL_S=0.1 rdv_wait_files 20 "late file" "{later}"')
    timer.join()
    assert r.returncode == 0, r.stderr


def test_wait_stops_early_when_the_job_failed(tmp_path):
    rdv = tmp_path / "rdv"
    r = bash(
        f'RDV_DIR="{rdv}"; rdv_mark_failed "$RDV_DIR" "trainer 1 died"; '
        f'RDV_POLL_S=0.1 rdv_wait_files 30 "servers" "{rdv}/never"',
        env={"SLURM_NODEID": "2"},
    )
    assert r.returncode == 2
    assert "node 2: trainer 1 died" in r.stderr


def test_markers_first_failure_reason_wins(tmp_path):
    r = bash(
        f'rdv_mark_failed "{tmp_path}" "first"; rdv_mark_failed "{tmp_path}" "second"; '
        f'rdv_finished "{tmp_path}" && echo finished; rdv_failure_reason "{tmp_path}"'
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["finished", "node 0: first"]


def test_done_marker(tmp_path):
    r = bash(f'rdv_finished "{tmp_path}" || echo running; rdv_mark_done "{tmp_path}"; rdv_finished "{tmp_path}" && echo ended; rdv_failed "{tmp_path}" || echo ok')
    assert r.stdout.splitlines() == ["running", "ended", "ok"]


def test_wait_http_is_bounded():
    start = time.monotonic()
    r = bash('RDV_POLL_S=0.1 rdv_wait_http 1 "http://127.0.0.1:9/v1/models"')
    assert r.returncode == 1
    assert "http://127.0.0.1:9/v1/models" in r.stderr
    assert time.monotonic() - start < 15


def test_advertise_ip_override_wins():
    r = bash("rdv_advertise_ip", env={"SERVE_ADVERTISE_IP": "10.1.2.3"})
    assert r.stdout.strip() == "10.1.2.3"
    # One node: every peer is local, so loopback (no traffic leaves through a real interface).
    assert bash("rdv_advertise_ip").stdout.strip() == "127.0.0.1"
    assert bash("rdv_advertise_ip", env={"SLURM_NNODES": "1"}).stdout.strip() == "127.0.0.1"
    r = bash("rdv_advertise_ip", env={"SLURM_NNODES": "3"})
    assert r.returncode == 0 and r.stdout.strip().count(".") == 3


PLAN = {"SERVE_NODE_IDS": "0,2", "TRAIN_NODE_IDS": "1,3", "TRAINER_SERVER_MAP": "1:0,3:2"}


@pytest.mark.parametrize(
    "node,role,rank,server",
    [("0", "serve", None, ""), ("1", "train", "0", "0"), ("2", "serve", None, ""), ("3", "train", "1", "2")],
)
def test_plan_roles(node, role, rank, server):
    env = dict(PLAN, SLURM_NODEID=node)
    assert bash("plan_role", env).stdout.strip() == role
    assert bash("plan_preferred_server", env).stdout.strip() == server
    r = bash("plan_trainer_rank", env)
    if rank is None:
        assert r.returncode != 0 and "not a trainer" in r.stderr
    else:
        assert r.stdout.strip() == rank


def test_plan_rejects_a_node_outside_the_plan():
    r = bash("plan_role", dict(PLAN, SLURM_NODEID="7"))
    assert r.returncode != 0 and "neither" in r.stderr


def test_plan_counts_and_head():
    r = bash('plan_count "$TRAIN_NODE_IDS"; plan_count ""; plan_head_trainer', PLAN)
    assert r.stdout.split() == ["2", "0", "1"]

