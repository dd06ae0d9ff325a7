"""Fast checks of tests/slurm/cluster.sh that need no cluster: argument errors (shellcheck: tests/common)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CLUSTER_SH = HERE / "cluster.sh"


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "missing command"),
        (["start"], "unknown command 'start'"),
        (["up", "--version", "23.02"], "--version must be 22.05 or 24.11 (got '23.02')"),
        (["up", "--nodes", "0"], "--nodes must be 1..99 (got '0')"),
        (["up", "--nodes"], "--nodes needs a value"),
        (["up", "--state-dir", "relative/dir"], "--state-dir needs an absolute path (got 'relative/dir')"),
        (["up", "--bind", "tmp"], "--bind needs an absolute path (got 'tmp')"),
        (["up", "--name", "Bad_Name"], "--name must be 2-5 lowercase letters/digits"),
        (["up", "--timeout", "soon"], "--timeout must be a positive number of seconds (got 'soon')"),
        (["up", "--frob"], "unknown option '--frob'"),
        (["up", "--state-dir", "/tmp/" + "x" * 90], "--state-dir is too long for munge's socket path"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(args: list[str], message: str):
    proc = subprocess.run(["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc
    first = proc.stderr.splitlines()[0]
    assert message in first
    assert proc.stderr.splitlines()[1].startswith("usage: cluster.sh ")
