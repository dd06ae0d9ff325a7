"""Dry-runs: every example renders; sbatch text is exact; env values survive the shell; nothing is submitted."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from launcher import run_job
from launcher.layout import ENV_BEGIN, ENV_END
from launcher.spec import REPO_ROOT

EXAMPLES = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "examples").rglob("*.yaml"))
TRICKY = "a b  'single' \"double\" $HOME $$ `tick` \\n ; | & * ~"


def test_all_named_examples_exist():
    for name in [
        "examples/Qwen/Qwen3-8B/hf_streaming_eagle3.yaml",
        "examples/Qwen/Qwen3-8B/hf_streaming_eagle3_multi_node.yaml",
        "examples/moonshotai/Kimi-K2.5/hf_streaming_eagle3_multi_node.yaml",
        "examples/moonshotai/Kimi-K2.5/hf_streaming_dflash_multi_node.yaml",
        "examples/meta-llama/Llama-3.1-8B/hf_streaming_eagle3.yaml",
        "examples/local/quickstart.yaml",
        "examples/local/quickstart_dflash.yaml",
        "examples/local/slurm_streaming_eagle3.yaml",
    ]:
        assert name in EXAMPLES


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_dry_runs(example, tmp_path):
    result = run_job(REPO_ROOT / example, mode="dryrun", job_dir=tmp_path, environ={})
    assert result.tasks, example
    if result.job.spec.pipeline.skip:  # a spec kept for its plan only (the DFlash one): nothing rendered
        assert all(t.state == "SKIPPED" and t.script_text is None for t in result.tasks)
        assert not result.dryrun_dir.exists()
        return
    for t in result.tasks:
        assert t.dryrun_script is not None and t.dryrun_script.read_text() == t.script_text
        assert t.dryrun_script.parent == result.dryrun_dir
        assert t.job_id is None and t.state is None  # nothing submitted
        if t.kind == "slurm":
            assert t.script_text.startswith("#!/bin/bash")
            nodes = result.job.tasks[[x.name for x in result.tasks].index(t.name)].slurm.nodes
            assert f"#SBATCH --nodes={nodes}\n" in t.script_text
            assert re.search(r"#SBATCH --time=\d", t.script_text)  # never nemo_run's 10-minute default
            assert "launcher/node_exec.sh" in t.script_text
        else:
            assert "node_exec.sh" in t.script_text or "MODELOPT_REPO" in t.script_text
    # The experiment folder nemo_run rendered into is gone: a dry run leaves only the scripts.
    leftovers = [p for p in (tmp_path / "experiments").rglob("*") if p.is_file()]
    assert leftovers == []


def test_kimi_segment_plan_and_container_mounts(tmp_path):
    spec = REPO_ROOT / "examples/moonshotai/Kimi-K2.5/hf_streaming_eagle3_multi_node.yaml"
    result = run_job(spec, mode="dryrun", job_dir=tmp_path, run_id="r1", environ={})
    train = result.tasks[1]
    text = train.script_text
    assert (
        "#SBATCH --nodes=4\n" in text
        and "#SBATCH --segment=2\n" in text
        and "#SBATCH --gpus-per-node=4\n" in text
    )
    assert "export SERVE_NODE_IDS=0,2\nexport TRAIN_NODE_IDS=1,3\nexport TRAINER_SERVER_MAP=1:0,3:2\n" in text
    assert "export SEGMENT_SIZE=2\n" in text and "export MODELOPT_SCRATCH=/scratchspace\n" in text
    scratch = tmp_path / "Kimi-K2.5_EAGLE3_streaming_multi_node" / "r1" / "scratch"
    assert f"{REPO_ROOT}:{REPO_ROOT}," in text and f"{scratch}:/scratchspace" in text
    assert f"export MODELOPT_REPO={REPO_ROOT}\n" in text
    assert "train nodes: 1,3" in train.plan and "serve nodes: 0,2" in train.plan
    # The second task waits for the first: afterok on the sbatch command line.
    assert "--dependency=afterok:<job id of task_0>" in train.sbatch_command
    # Inline task 0: its script text is shown and kept next to the sbatch script.
    assert result.tasks[0].inline_script and "cp " in result.tasks[0].inline_script[1]
    assert (result.dryrun_dir / "task_0.inline.sh").exists()


def _env_block(script: str) -> str:
    return script[script.index(ENV_BEGIN) : script.index(ENV_END)]


def test_env_values_with_spaces_and_quotes_arrive_intact(write_spec, tmp_path):
    spec = {
        "job_name": "quoting",
        "pipeline": {
            "task_0": {
                "script": "tests/launcher/fixtures/user_streaming.sh",  # a user script: args not checked
                "args": ["--msg 'two  words'", "cost=$$5"],
                "environment": [{"TRICKY": TRICKY}, {"EMPTY": ""}],
                "slurm_config": {"nodes": 2, "time": "5"},
            }
        },
    }
    result = run_job(write_spec(spec), mode="dryrun", job_dir=tmp_path, environ={})
    text = result.tasks[0].script_text
    # Run the exact export lines of the sbatch script with bash and read the values back.
    probe = _env_block(text) + '\nprintf "%s\\n---\\n%s" "$TRICKY" "$EMPTY"\n'
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out == f"{TRICKY}\n---\n"
    # Args stay shell text, verbatim (nemo_run's Template pass would turn `$$` into `$`).
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert srun.endswith("user_streaming.sh --msg 'two  words' cost=$$5")
    assert "#SBATCH --time=5\n" in text


def test_same_run_id_renders_identical_text(tmp_path):
    spec = REPO_ROOT / "examples/local/slurm_streaming_eagle3.yaml"
    a = run_job(spec, mode="dryrun", job_dir=tmp_path, run_id="same", environ={})
    b = run_job(spec, mode="dryrun", job_dir=tmp_path, run_id="same", environ={})
    assert a.tasks[0].script_text == b.tasks[0].script_text
    assert (
        a.tasks[0].submitted_script
        == tmp_path / "experiments/slurm_streaming_eagle3/slurm_streaming_eagle3_same/task_0_sbatch.sh"
    )


def test_local_dry_run_shows_command_and_env(tmp_path):
    result = run_job(
        REPO_ROOT / "examples/local/quickstart.yaml", mode="dryrun", job_dir=tmp_path, environ={}
    )
    text = result.tasks[1].script_text  # task_0 prepares the tiny target; task_1 is the streaming one
    assert "export SERVE_NODE_IDS=0\nexport TRAIN_NODE_IDS=0\n" in text
    assert (
        f"exec bash {REPO_ROOT}/launcher/node_exec.sh {REPO_ROOT}/common/eagle3/train_eagle_streaming.sh"
        in text
    )
    assert Path(result.scratch_dir).parent.parent == tmp_path / "quickstart"


def test_skipped_pipeline_runs_nothing(tmp_path):
    spec = REPO_ROOT / "examples/local/quickstart.yaml"
    result = run_job(spec, ["pipeline.skip=true"], mode="submit", job_dir=tmp_path, environ={})
    assert [t.state for t in result.tasks] == ["SKIPPED"] * 3 and result.ok
    assert not (tmp_path / "experiments").exists()


def test_model_optimizer_slurm_extras_render(write_spec, tmp_path):
    spec = {
        "job_name": "extras",
        "pipeline": {
            "task_0": {
                "inline": "hostname",
                "slurm_config": {
                    "nodes": 1,
                    "retries": 2,
                    "requeue": True,
                    "additional_parameters": {"mail_type": "END", "exclusive": True},
                    "account": "acct_team",
                    "qos": "high",
                    "mem": 0,
                    "array": "0-3",
                },
            }
        },
    }
    text = run_job(write_spec(spec), mode="dryrun", job_dir=tmp_path, environ={}).tasks[0].script_text
    for line in [
        "--account=acct_team",
        "--qos=high",
        "--mem=0",
        "--array=0-3",
        "--mail-type=END",
        "--exclusive\n",
        "--requeue\n",
    ]:
        assert f"#SBATCH {line}" in text
    assert "export TORCHX_MAX_RETRIES=2\n" in text


def test_remote_host_renders_cluster_paths_without_connecting(write_spec, tmp_path):
    spec = {
        "job_name": "remote",
        "job_dir": "/lustre/me/jobs",
        "repo_dir": "/lustre/me/modelopt-ext",
        "user": "me",
        "pipeline": {
            "task_0": {
                "script": "common/eagle3/train_eagle_streaming.sh",
                # Paths on the cluster are not checked from here (the recipe ships with the repo: it is).
                "args": ["--config recipes/eagle3/Qwen3-8B.yaml", "data.path=/lustre/me/data/train.jsonl"],
                "environment": {"SERVE_NODES": "1"},
                "slurm_config": {"host": "login.cluster.example", "nodes": 2, "gpus_per_node": 8},
            }
        },
    }
    result = run_job(write_spec(spec), mode="dryrun", job_dir=tmp_path, run_id="r9", environ={})
    text = result.tasks[0].script_text
    assert "export MODELOPT_REPO=/lustre/me/modelopt-ext\n" in text
    assert "export MODELOPT_SCRATCH=/lustre/me/jobs/remote/r9/scratch\n" in text
    assert "bash /lustre/me/modelopt-ext/launcher/node_exec.sh /lustre/me/modelopt-ext/common/eagle3/" in text
    assert (
        "#SBATCH --output=/lustre/me/jobs/experiments/remote/remote_r9/task_0/sbatch_remote-task_0_%j.out"
        in text
    )
    assert result.dryrun_dir == tmp_path / "remote" / "r9" / "dryrun"  # written on this machine


def test_allow_to_fail_chains_with_afterany(write_spec, tmp_path):
    tasks = {f"task_{i}": {"inline": "hostname", "slurm_config": {"nodes": 1}} for i in range(3)}
    spec = {"job_name": "chain", "pipeline": {"allow_to_fail": True, **tasks}}
    result = run_job(write_spec(spec), mode="dryrun", job_dir=tmp_path, environ={})
    commands = [t.sbatch_command for t in result.tasks]
    assert "--dependency" not in commands[0]
    assert "--dependency=afterany:<job id of task_0> " in commands[1]
    assert "--dependency=afterany:<job id of task_1> " in commands[2]
    spec["pipeline"]["allow_to_fail"] = False
    result = run_job(write_spec(spec), mode="dryrun", job_dir=tmp_path, environ={})
    assert "--dependency=afterok:<job id of task_1> " in result.tasks[2].sbatch_command


@pytest.mark.parametrize("serve_nodes,survives", [("2", True), ("1", False)])
def test_multi_server_streaming_survives_a_lost_serve_node_under_srun(
    write_spec, tmp_path, serve_nodes, survives
):
    """nemo_run's srun kills every task when one exits badly and 60 s after one ends: with several serve
    nodes the task runs with --kill-on-bad-exit=0 --wait=0 --no-kill (the spec's own srun_args still come last)
    and the job with sbatch --no-kill, so a lost node (its host) does not end the job."""
    spec = {
        "job_name": "survive",
        "pipeline": {
            "task_0": {
                # A user script: the trainer's own contract (--config ...) is not what this test is about.
                "script": "tests/launcher/fixtures/user_streaming.sh",
                "streaming": True,
                "environment": {"SERVE_NODES": serve_nodes},
                "slurm_config": {"nodes": 3, "time": "5", "srun_args": ["--mpi=none"]},
            }
        },
    }
    text = run_job(write_spec(spec), mode="dryrun", job_dir=tmp_path, environ={}).tasks[0].script_text
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    if survives:
        assert "--wait=60 --kill-on-bad-exit=1 --kill-on-bad-exit=0 --wait=0 --no-kill --mpi=none" in srun
        assert "#SBATCH --no-kill" in text  # a failed node does not end the job either
    else:
        assert "--wait=60 --kill-on-bad-exit=1 --mpi=none" in srun
        assert "--no-kill" not in text
