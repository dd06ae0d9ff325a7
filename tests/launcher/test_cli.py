"""launch.py end to end as a user runs it: exit codes, one line per problem, no torch, plain-text dry-run."""

from __future__ import annotations

import os
import subprocess
import sys

from launcher.spec import REPO_ROOT

KIMI = "examples/moonshotai/Kimi-K2.5/hf_streaming_eagle3_multi_node.yaml"


def launch(*args, env_extra=None, stdin=subprocess.DEVNULL, timeout=240):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "launch.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
        stdin=stdin,
        timeout=timeout,
        check=False,
    )


def test_kimi_dry_run_prints_plan_and_exact_sbatch_without_importing_torch(tmp_path, cli_reporting_torch):
    # Run the CLI's main() in a fresh interpreter and report afterwards whether torch got imported.
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "MODELOPT_JOB_DIR": str(tmp_path / "jobs"), "HOME": str(home)}
    env.pop("NEMORUN_HOME", None)
    p = cli_reporting_torch(["--yaml", KIMI, "--dryrun", "--run-id", "cli1"], env)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "TORCH_IMPORTED=False" in out
    assert (
        "serve nodes: 0,2" in out
        and "train nodes: 1,3" in out
        and "trainer -> preferred server: 1->0, 3->2" in out
    )
    assert "#SBATCH --nodes=4\n" in out and "#SBATCH --segment=2\n" in out
    assert "\x1b[" not in out  # plain text, no rich markup or colours
    dry = tmp_path / "jobs/Kimi-K2.5_EAGLE3_streaming_multi_node/cli1/dryrun"
    assert f"scripts written to {dry}" in out
    assert (dry / "task_1.sbatch.sh").read_text() in out
    assert not (home / ".nemo_run").exists()  # NEMORUN_HOME points under the job dir, never ~/.nemo_run


def test_impossible_segment_is_one_line_exit_2():
    p = launch("--yaml", KIMI, "--dryrun", "pipeline.task_1.slurm_config.segment=3")
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert "pipeline.task_1.slurm_config.segment: 3 does not divide nodes=4" in lines[0]
    assert "Traceback" not in p.stderr


def test_misspelled_key_gets_did_you_mean(tmp_path):
    spec = (REPO_ROOT / KIMI).read_text().replace("      segment: 2\n", "      segmnet: 2\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec)
    p = launch("--yaml", str(bad), "--dryrun")
    assert p.returncode == 2
    expected = (
        f"error: {bad}: pipeline.task_1.slurm_config.segmnet: unknown key (did you mean 'segment'?); allowed keys: "
        "_factory_, account, additional_parameters, array, container, container_mounts, gpus_per_node, host, mem, "
        "nodes, ntasks_per_node, partition, port, qos, requeue, retries, segment, srun_args, time"
    )
    assert p.stderr.splitlines() == [expected]


def test_slurm_submit_without_yes_refuses_when_stdin_is_not_a_tty():
    p = launch("--yaml", "examples/local/slurm_streaming_eagle3.yaml")
    assert p.returncode == 2
    assert "not submitting: stdin is not a terminal" in p.stderr and "--yes" in p.stderr
    assert "submitted" not in p.stdout


def test_bad_override_syntax_and_missing_file():
    p = launch("--yaml", KIMI, "--dryrun", "pipeline.task_1.slurm_config.segment")
    assert p.returncode == 2 and p.stderr.strip().endswith("expected KEY.PATH=VALUE")
    p = launch("--yaml", "examples/nope.yaml", "--dryrun")
    assert p.returncode == 2 and p.stderr.strip() == "error: examples/nope.yaml: file not found"


class _Terminal:
    """A stdin that claims to be a terminal and answers the confirmation prompt."""

    def __init__(self, answer: str):
        self.answer = answer

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        return self.answer


def test_confirmation_on_a_terminal_declined_submits_nothing(capsys, tmp_path):
    from launcher.cli import main

    rc = main(
        ["--yaml", "examples/local/slurm_streaming_eagle3.yaml", "--job-dir", str(tmp_path)],
        stdin=_Terminal("n\n"),
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert "Submit 4 task(s) of slurm_streaming_eagle3 to Slurm on localhost? [y/N]" in out
    assert "serve nodes: 0" in out and "train nodes: 1,2" in out
    assert out.rstrip().endswith("not submitted")
    assert not (tmp_path / "experiments").exists()
