"""Submission failures: one line, no traceback, and no job left behind when a later sbatch fails.

`sbatch`/`scancel` here are tiny scripts on PATH (the launcher calls Slurm commands by name); the real
cluster is exercised in tests/slurm.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from launcher import LaunchError, run_job

SBATCH = """#!/usr/bin/env bash
# First submission succeeds (job 41), the next one is refused like a real sbatch would.
count_file="{state}/count"
n=$(( $(cat "$count_file" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$count_file"
echo "sbatch $*" >> "{state}/calls"
if [[ "$n" -ge {fail_at} ]]; then
  echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
  exit 1
fi
echo 4$n
"""
SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >> "{state}/calls"
"""


def _fake_slurm(tmp_path: Path, fail_at: int) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("sbatch", SBATCH), ("scancel", SCANCEL)):
        path = bindir / name
        path.write_text(text.format(state=tmp_path, fail_at=fail_at))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bindir


def _spec(write_spec, tasks: int):
    pipeline = {
        f"task_{i}": {"inline": "hostname", "slurm_config": {"nodes": 1, "time": "5"}} for i in range(tasks)
    }
    return write_spec({"job_name": "fails", "pipeline": pipeline})


def test_refused_submission_is_one_line_and_earlier_jobs_are_cancelled(write_spec, tmp_path, monkeypatch):
    bindir = _fake_slurm(tmp_path, fail_at=2)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(LaunchError) as e:
        run_job(_spec(write_spec, 2), mode="submit", job_dir=tmp_path / "jobs", environ={})
    assert str(e.value) == (
        "submission failed: sbatch: error: Batch job submission failed: Invalid partition name specified"
    )
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("sbatch --requeue --parsable ") and calls[0].endswith("task_0_sbatch.sh")
    assert calls[1].startswith("sbatch --requeue --parsable --dependency=afterok:41 ")
    assert (
        calls[-1] == "scancel 41"
    )  # the job that did get in is not left waiting for a sibling that never comes
