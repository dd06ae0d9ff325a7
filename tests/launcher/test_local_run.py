"""The local executor really runs tasks on this machine: env contract, scratch, cwd, afterok chaining."""

from __future__ import annotations

from pathlib import Path

from launcher import run_job
from launcher.spec import REPO_ROOT

TRICKY = "spaces  and 'single' \"double\" $HOME `x`"


def test_local_pipeline_runs_in_order_and_stops_after_a_failure(write_spec, tmp_path):
    spec = {
        "job_name": "localrun",
        "pipeline": {
            "task_0": {
                "inline": (
                    'printf "TRICKY=[%s]\\n" "$TRICKY"\n'
                    'echo "role serve=$SERVE_NODE_IDS train=$TRAIN_NODE_IDS task=$MODELOPT_TASK pwd=$(pwd)"\n'
                    'echo handoff > "$MODELOPT_SCRATCH/from_task_0"\n'
                ),
                "environment": [{"TRICKY": TRICKY}],
            },
            "task_1": {"inline": 'cat "$MODELOPT_SCRATCH/from_task_0"\necho "about to fail" >&2\nexit 4'},
            "task_2": {"inline": "echo should-not-run"},
        },
    }
    lines: list[str] = []
    result = run_job(write_spec(spec), mode="submit", job_dir=tmp_path, environ={}, echo=lines.append)
    states = [t.state for t in result.tasks]
    assert states == ["SUCCEEDED", "FAILED", "NOT_RUN"], (states, lines)
    assert not result.ok
    log0 = Path(result.tasks[0].log_paths[0]).read_text()
    assert f"TRICKY=[{TRICKY}]" in log0
    assert f"role serve= train=0 task=task_0 pwd={REPO_ROOT}" in log0
    assert "handoff" in Path(result.tasks[1].log_paths[0]).read_text()  # scratch is shared between tasks
    assert result.tasks[1].reason == "about to fail"
    assert result.tasks[2].log_paths == []
    assert any(line == f"  | TRICKY=[{TRICKY}]" for line in lines)  # the task's output is echoed live
    assert (Path(result.scratch_dir) / "from_task_0").read_text() == "handoff\n"


def test_quickstart_plan(tmp_path):
    # The quickstart itself runs in tests/e2e/test_quickstart.py (minutes); here only its plan.
    result = run_job(REPO_ROOT / "examples/local/quickstart.yaml", mode="validate", job_dir=tmp_path, environ={})
    assert [t.name for t in result.tasks] == ["task_0", "task_1", "task_2"]
    assert {t.kind for t in result.tasks} == {"local"}
    assert "node 0 serves hidden states AND trains" in "\n".join(result.tasks[1].plan)
