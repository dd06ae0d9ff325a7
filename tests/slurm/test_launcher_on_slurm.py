"""The launcher (`launch.py`) against the real local Slurm clusters: roles per node, --segment, dry-run fidelity.

Each test calls `launch.py` as a user would (a subprocess of this venv's python, the cluster's client
wrappers first on PATH, so nemo_run's LocalTunnel finds `sbatch` by name), then checks what happened on
every node through the files the nodes wrote into MODELOPT_SCRATCH (tests/slurm/report_role.sh).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurm_testlib import SlurmCluster, record_timing

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[2]
SPECS = Path(__file__).with_name("specs")
ROLES_3 = SPECS / "roles_3node.yaml"
ROLES_4_SEG2 = SPECS / "roles_4node_segment2.yaml"
GREETING = 'it\'s a "quoted" value with  two spaces'
LAUNCH_TIMEOUT_S = 600


def launch(cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`launch.py ARGS` with the cluster's wrappers first on PATH; output as text."""
    env = cluster.env()
    env.pop("MODELOPT_JOB_DIR", None)
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=LAUNCH_TIMEOUT_S,
        check=False,
    )


def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def node_reports(scratch: Path) -> dict[int, dict[str, str]]:
    return {int(r["NODE_ID"]): r for r in map(read_env_file, sorted((scratch / "roles").glob("node-*.env")))}


def submitted_job_ids(stdout: str) -> dict[str, int]:
    """task name -> job id, from launch.py's `submitted TASK: job ID` lines."""
    ids = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^submitted (\S+): job (\d+)$", stdout, re.MULTILINE)
    }
    assert ids, f"no job id in launch.py output:\n{stdout}"
    return ids


@dataclass(frozen=True)
class PrintedScript:
    """One task's sbatch script as `launch.py --dryrun` printed it."""

    dryrun_file: Path
    submitted_with: str
    text: str

    @property
    def submitted_path(self) -> Path:
        """The file nemo_run writes and passes to sbatch (last word of the `# submitted with:` line)."""
        return Path(self.submitted_with.split()[-1])


def printed_scripts(stdout: str) -> dict[str, PrintedScript]:
    """Parse the dry-run output: per task, its script file, sbatch command line and the script text."""
    scripts: dict[str, PrintedScript] = {}
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        header = re.match(r"^===== (\S+): sbatch script \((.+)\) =====$", line)
        if not header:
            continue
        submitted = re.match(r"^# submitted with: (.*)$", lines[i + 1])
        assert submitted, lines[i + 1]
        body = []
        for text in lines[i + 2 :]:
            if text.startswith(("===== ", "----- ", "dry run: nothing submitted")):
                break
            body.append(text)
        scripts[header.group(1)] = PrintedScript(Path(header.group(2)), submitted.group(1), "\n".join(body))
    assert scripts, f"no sbatch script in the dry-run output:\n{stdout}"
    return scripts


def all_job_ids(cluster: SlurmCluster) -> set[int]:
    """Every job the controller knows, finished ones included (they stay ~300 s; there is no sacct)."""
    out = cluster.run("scontrol", "-o", "show", "jobs").stdout
    return {int(m) for m in re.findall(r"^JobId=(\d+)", out, re.MULTILINE)}


@dataclass
class LaunchedJob:
    """The 3-node roles job (task_0) and the task chained after it (task_1): dry-run first, then
    submitted with the same run id."""

    job_dir: Path
    dryrun_stdout: str
    dryrun_files: dict[str, str]
    submit: subprocess.CompletedProcess[str]
    job_ids: dict[str, int]
    elapsed_s: float

    @property
    def scratch(self) -> Path:
        return self.job_dir / "slurm_roles" / "r1" / "scratch"


@pytest.fixture(scope="module")
def roles_job(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> LaunchedJob:
    job_dir = tmp_path_factory.mktemp("launch-roles")
    common = ["--yaml", str(ROLES_3), "--job-dir", str(job_dir), "--run-id", "r1"]
    dry = launch(slurm_cluster, *common, "--dryrun")
    assert dry.returncode == 0, dry.stderr
    # Read the dry-run files now: the submit below renders this folder again.
    dry_files = {task: p.dryrun_file.read_text() for task, p in printed_scripts(dry.stdout).items()}
    before = all_job_ids(slurm_cluster)
    start = time.monotonic()
    sub = launch(slurm_cluster, *common, "--yes")
    elapsed = time.monotonic() - start
    assert sub.returncode == 0, f"launch.py --yes failed:\n{sub.stdout}\n{sub.stderr}"
    job_ids = submitted_job_ids(sub.stdout)
    assert sorted(job_ids) == ["task_0", "task_1"]
    assert not set(job_ids.values()) & before
    return LaunchedJob(job_dir, dry.stdout, dry_files, sub, job_ids, elapsed)


def test_three_node_job_through_launcher_reports_planned_roles(
    slurm_cluster: SlurmCluster, roles_job: LaunchedJob
):
    # launch.py followed both jobs to the end before it returned.
    result = slurm_cluster.wait_job(roles_job.job_ids["task_0"], timeout=30)
    assert result.state == "COMPLETED", result.record
    assert f"task_0 job {roles_job.job_ids['task_0']}: COMPLETED" in roles_job.submit.stdout
    record_timing(
        f"slurm 22.05: 3-node task + chained 1-node task through `launch.py --yes` (nemo_run import, submit, follow) "
        f"{roles_job.elapsed_s:.1f}s; Slurm submit->end {result.record.get('SubmitTime')} -> "
        f"{result.record.get('EndTime')}"
    )
    reports = node_reports(roles_job.scratch)
    assert sorted(reports) == [0, 1, 2]
    expected_roles = {0: "serve", 1: "train", 2: "train"}
    for node_id, report in reports.items():
        assert report["ROLE"] == expected_roles[node_id], report
        assert report["HOSTNAME"] == slurm_cluster.nodes[node_id]
        assert report["ADDRESSES"] == slurm_cluster.node_ips[node_id]
        assert report["SERVE_NODES"] == "1"
        assert report["SERVE_NODE_IDS"] == "0"
        assert report["TRAIN_NODE_IDS"] == "1,2"
        assert report["TRAINER_SERVER_MAP"] == "1:0,2:0"
        assert report["SLURM_NNODES"] == "3"
        assert report["MODELOPT_REPO"] == str(REPO)
        assert report["PWD"] == str(REPO)
        assert report["GREETING"] == GREETING
        assert report["ARGS"] == "--tag planned"


def test_chained_task_runs_after_the_first_and_sees_its_files(
    slurm_cluster: SlurmCluster, roles_job: LaunchedJob
):
    first = slurm_cluster.job_record(roles_job.job_ids["task_0"])
    second = slurm_cluster.wait_job(roles_job.job_ids["task_1"], timeout=30)
    assert second.state == "COMPLETED", second.record
    assert f"task_1 job {roles_job.job_ids['task_1']}: COMPLETED" in roles_job.submit.stdout
    assert second.record["StartTime"] >= first["EndTime"]  # ISO timestamps compare as text
    assert second.record["NumNodes"] == "1"
    saw = (roles_job.scratch / "after_task_0.txt").read_text().split()
    assert saw[0] in slurm_cluster.nodes
    assert saw[1:] == ["saw", "3", "node", "reports"]


def test_dryrun_text_equals_submitted_script(slurm_cluster: SlurmCluster, roles_job: LaunchedJob):
    printed = printed_scripts(roles_job.dryrun_stdout)
    assert sorted(printed) == ["task_0", "task_1"]
    for task, script in printed.items():
        # The script printed by --dryrun and the file it wrote are the same text ...
        assert script.text.rstrip("\n") == roles_job.dryrun_files[task].rstrip("\n"), task
        # ... as the sbatch script nemo_run wrote and submitted ...
        assert script.submitted_path.read_text() == roles_job.dryrun_files[task], task
        # ... and as the batch script Slurm itself holds for the job.
        job_id = str(roles_job.job_ids[task])
        held = slurm_cluster.run("scontrol", "write", "batch_script", job_id, "-").stdout
        assert held == roles_job.dryrun_files[task], task
    assert "--dependency=afterok:" in printed["task_1"].submitted_with


def test_segment_job_through_launcher_runs_with_servers_in_every_segment(
    slurm_cluster_2411: SlurmCluster, tmp_path: Path
):
    job_dir = tmp_path / "jobs"
    start = time.monotonic()
    proc = launch(
        slurm_cluster_2411, "--yaml", str(ROLES_4_SEG2), "--job-dir", str(job_dir), "--run-id", "g1", "--yes"
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"launch.py --yes failed:\n{proc.stdout}\n{proc.stderr}"
    job_id = submitted_job_ids(proc.stdout)["task_0"]
    record_timing(f"slurm 24.11: 4-node segment=2 job through `launch.py --yes` {elapsed:.1f}s")
    held = slurm_cluster_2411.run("scontrol", "write", "batch_script", str(job_id), "-").stdout
    assert "#SBATCH --segment=2\n" in held
    assert "#SBATCH --nodes=4\n" in held
    result = slurm_cluster_2411.wait_job(job_id, timeout=30)
    assert result.state == "COMPLETED", result.record
    assert result.record["NumNodes"] == "4"

    reports = node_reports(job_dir / "slurm_segment_roles" / "g1" / "scratch")
    assert sorted(reports) == [0, 1, 2, 3]
    roles = {i: r["ROLE"] for i, r in reports.items()}
    assert roles == {0: "serve", 1: "train", 2: "serve", 3: "train"}
    for node_id, report in reports.items():
        assert report["HOSTNAME"] == slurm_cluster_2411.nodes[node_id]
        assert report["SEGMENT_SIZE"] == "2"
        assert report["TRAINER_SERVER_MAP"] == "1:0,3:2"
    # Every segment (topology block of 2 nodes) holds one server and one trainer.
    for segment in range(2):
        members = [2 * segment, 2 * segment + 1]
        assert sorted(roles[i] for i in members) == ["serve", "train"]


def test_impossible_segment_is_rejected_by_our_validation_before_submitting(
    slurm_cluster_2411: SlurmCluster, tmp_path: Path
):
    before = all_job_ids(slurm_cluster_2411)
    queued_before = slurm_cluster_2411.job_ids()
    proc = launch(
        slurm_cluster_2411,
        "--yaml",
        str(ROLES_4_SEG2),
        "--job-dir",
        str(tmp_path / "jobs"),
        "--run-id",
        "bad1",
        "--yes",
        "pipeline.task_0.slurm_config.segment=3",
    )
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "pipeline.task_0.slurm_config.segment" in lines[0]
    assert "Traceback" not in proc.stderr
    # Nothing reached Slurm: no new job, queued or finished.
    assert all_job_ids(slurm_cluster_2411) == before
    assert slurm_cluster_2411.job_ids() == queued_before
    assert not os.path.exists(tmp_path / "jobs" / "experiments")
