"""cluster.sh itself: `up` is idempotent, a killed cluster is cleaned up and restarted, `down` leaves nothing.

Runs its own small 22.05 cluster under another name (`--name t22`: own namespaces, addresses and hosts
lines), so the session clusters other tests use are never disturbed.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
from slurm_testlib import SlurmCluster, cluster_sh, leftovers, namespace_inodes

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

NAME = "t22"


def pids(state_dir: Path) -> dict[str, int]:
    lines = (state_dir / "run" / "pids").read_text().split("\n")
    return {name: int(pid) for name, pid in (line.split() for line in lines if line)}


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def up(state_dir: Path) -> str:
    proc = cluster_sh(
        "up", "--version", "22.05", "--name", NAME, "--nodes", "2", "--state-dir", str(state_dir), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(state_dir)
    return proc.stderr


def wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.1)
    return path.read_text()


@pytest.mark.usefixtures("slurm_2205_installed")
def test_up_twice_stale_restart_and_clean_down(tmp_path: Path):
    # A short state dir: munge's socket lives in it and unix socket paths are limited to 108 bytes.
    short = Path(tempfile.mkdtemp(prefix="t22-", dir="/tmp"))
    state_dir = short / "state"
    try:
        up(state_dir)
        cluster = SlurmCluster.from_state_dir(state_dir)
        assert cluster.nodes == ["t22n1", "t22n2"]
        first = pids(state_dir)

        # Idempotent: a second `up` keeps the running daemons.
        assert "already up" in up(state_dir)
        assert pids(state_dir) == first

        # A controller killed hard (as by a killed test run): the next `up` cleans and restarts.
        os.kill(first["slurmctld"], signal.SIGKILL)
        assert "stale" in up(state_dir)
        second = pids(state_dir)
        assert second["slurmctld"] != first["slurmctld"]
        assert not any(alive(pid) for pid in first.values())

        # A job still running at `down` (its task is not a daemon we started directly) must not survive it.
        script = tmp_path / "sleeper.sh"
        script.write_text(
            f"#!/bin/bash\necho $$ > {tmp_path}/sleeper.pid.tmp\nmv {tmp_path}/sleeper.pid.tmp "
            f"{tmp_path}/sleeper.pid\nexec sleep 300\n"
        )
        cluster.sbatch(script, "-N", "1", "-o", str(tmp_path / "sleeper.log"), cwd=tmp_path)
        sleeper = int(wait_for(tmp_path / "sleeper.pid"))
        assert alive(sleeper)
    finally:
        inodes = namespace_inodes(NAME)
        proc = cluster_sh(
            "down", "--version", "22.05", "--name", NAME, "--state-dir", str(state_dir), timeout=120
        )
    assert proc.returncode == 0, proc.stderr
    assert len(inodes) == 3  # controller + 2 nodes
    assert leftovers(NAME, None, inodes) == []
    assert not any(alive(pid) for pid in [*second.values(), sleeper])
    assert not state_dir.exists()
    short.rmdir()
    # `down` again is harmless.
    proc = cluster_sh(
        "down", "--version", "22.05", "--name", NAME, "--state-dir", str(state_dir), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
