"""Where a run's files go, and the environment every task receives (the env contract).

JOB_DIR/                                   spec `job_dir`, or $MODELOPT_JOB_DIR, or <repo>/runs
  <job_name>/<run_id>/scratch/             MODELOPT_SCRATCH: shared by all tasks and nodes of the run
  <job_name>/<run_id>/dryrun/              --dryrun writes the exact scripts here
  experiments/<job_name>/<job_name>_<run_id>/   nemo_run's experiment: sbatch scripts, task logs
  .nemo_run/                               NEMORUN_HOME (nemo_run's own bookkeeping)
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from launcher.spec import REPO_ROOT, Job, ResolvedTask
from modelopt_ext.util.errors import ConfigError

JOB_DIR_ENV = "MODELOPT_JOB_DIR"
CONTAINER_SCRATCH = "/scratchspace"
CONTAINER_HF_LOCAL = "/hf-local"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")


def new_run_id() -> str:
    """A UTC timestamp id (no underscores: nemo_run splits experiment ids on the last one)."""
    now = datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run, on this machine (`local_*`) and on the cluster's shared storage (`cluster_*`)."""

    job_name: str
    run_id: str
    local_root: Path
    cluster_root: PurePosixPath
    repo_dir: PurePosixPath

    @property
    def experiment_id(self) -> str:
        """nemo_run's experiment id: '<job_name>_<run_id>'."""
        return f"{self.job_name}_{self.run_id}"

    @property
    def local_run_dir(self) -> Path:
        """<job_dir>/<job_name>/<run_id> on this machine."""
        return self.local_root / self.job_name / self.run_id

    @property
    def dryrun_dir(self) -> Path:
        """Folder the dry-run scripts are written to."""
        return self.local_run_dir / "dryrun"

    @property
    def cluster_scratch(self) -> PurePosixPath:
        """Host path of the run's shared scratch folder (on Slurm: the shared filesystem)."""
        return self.cluster_root / self.job_name / self.run_id / "scratch"

    @property
    def local_experiments(self) -> Path:
        """nemo_run base folder's experiments/ (LocalTunnel job_dir)."""
        return self.local_root / "experiments"

    @property
    def cluster_experiments(self) -> PurePosixPath:
        """Same on the cluster (SSHTunnel job_dir)."""
        return self.cluster_root / "experiments"

    @property
    def local_experiment_dir(self) -> Path:
        """nemo_run's experiment folder for Slurm runs."""
        return self.local_experiments / self.job_name / self.experiment_id

    @property
    def nemorun_home(self) -> Path:
        """NEMORUN_HOME: nemo_run's bookkeeping stays under the job dir."""
        return self.local_root / ".nemo_run"

    def node_path(self, local: Path) -> str:
        """A path of this checkout as nodes see it (the repo may live elsewhere on the cluster)."""
        try:
            rel = Path(local).resolve().relative_to(REPO_ROOT)
        except ValueError:
            return str(local)
        return str(self.repo_dir / rel.as_posix()) if str(rel) != "." else str(self.repo_dir)


def make_layout(
    job: Job,
    *,
    remote: bool,
    job_dir: str | os.PathLike | None = None,
    run_id: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunLayout:
    """Resolve the run's folders: job_dir argument > $MODELOPT_JOB_DIR > spec job_dir > <repo>/runs."""
    environ = os.environ if environ is None else environ
    rid = run_id or new_run_id()
    if not _RUN_ID.match(rid):
        raise ConfigError([f"run id {rid!r}: use letters, digits, '.' and '-' (no '_' or '/')"])
    override = job_dir or environ.get(JOB_DIR_ENV) or None
    if remote:
        if not job.spec.job_dir:
            raise ConfigError(
                ["job_dir: required for a remote Slurm host (a folder on the cluster's shared storage)"]
            )
        cluster_root = PurePosixPath(job.spec.job_dir)
        local_root = Path(override or REPO_ROOT / "runs")
    else:
        local_root = Path(override or job.spec.job_dir or REPO_ROOT / "runs").expanduser().resolve()
        cluster_root = PurePosixPath(local_root.as_posix())
    # The local executor always runs this checkout; on Slurm the repo may sit elsewhere on shared storage.
    use_spec_repo = job.spec.repo_dir and job.kind == "slurm"
    repo_dir = PurePosixPath(job.spec.repo_dir) if use_spec_repo else PurePosixPath(REPO_ROOT.as_posix())
    return RunLayout(job.name, rid, Path(local_root), cluster_root, repo_dir)


def task_env(job: Job, task: ResolvedTask, layout: RunLayout, *, container: bool) -> dict[str, str]:
    """Everything a task's nodes receive: the spec's environment, then the launcher's contract on top."""
    env = dict(task.env)
    env.update(task.plan.env())
    env.update(
        {
            "MODELOPT_SCRATCH": CONTAINER_SCRATCH if container else str(layout.cluster_scratch),
            "MODELOPT_REPO": str(layout.repo_dir),
            "MODELOPT_JOB_NAME": job.name,
            "MODELOPT_RUN_ID": layout.run_id,
            "MODELOPT_TASK": task.name,
        }
    )
    if job.spec.hf_local:
        env.setdefault("HF_LOCAL", CONTAINER_HF_LOCAL if container else job.spec.hf_local)
    if container:
        # Inside an image the project runs on the image's own Python (topped up once per job by
        # common/lib/python.sh) and vLLM is the image's: never the repo's .venv built on the login node.
        env.setdefault("MODELOPT_PYTHON", "python3")
        env.setdefault("MODELOPT_EXT_VLLM_PYTHON", "python3")
    return env


ENV_BEGIN = "# >>> modelopt launcher: task environment (values single-quoted: they arrive verbatim)"
ENV_END = "# <<< modelopt launcher: task environment"


def export_lines(env: Mapping[str, str]) -> list[str]:
    """`export NAME='value'` lines; shell-quoted because nemo_run would export values unquoted."""
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
