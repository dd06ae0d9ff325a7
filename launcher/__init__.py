"""The job launcher: YAML job spec -> validated tasks -> role plan -> nemo_run executors (Slurm or local).

No ML imports here (torch, transformers, ...): validation and dry-runs run anywhere.
Library entry: `run_job(spec_path, overrides, mode="validate"|"dryrun"|"submit") -> RunResult`.
"""

from launcher.api import LaunchError, RunResult, TaskResult, run_job
from launcher.spec import Job, load_job
from launcher.topology import RolePlan, plan_roles

__all__ = ["Job", "LaunchError", "RolePlan", "RunResult", "TaskResult", "load_job", "plan_roles", "run_job"]
