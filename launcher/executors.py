"""Turn resolved tasks into nemo_run executors and scripts (Slurm, or local on this machine).

Workarounds for nemo_run 0.11.1, each deliberate:
- no-op `run.Packager()`: the default git packager needs a commit and ships only committed files; the
  repo is used in place from shared storage (MODELOPT_REPO) instead;
- the task environment goes into the sbatch script as our own quoted `export` lines (setup_lines), not
  executor.env_vars: nemo_run exports those unquoted and passes them through string.Template, which breaks
  values with spaces, quotes or `$$`;
- args pass through ExecutorMacros (string.Template), so `$` is doubled to survive it; args stay shell
  text as in Model-Optimizer (`--config FILE` in one item is two words);
- `time` is always set (nemo_run defaults to 10 minutes); the start-time poller thread is off.
"""

from __future__ import annotations

import getpass
import shlex
from dataclasses import dataclass
from typing import Any

from launcher.layout import (
    CONTAINER_HF_LOCAL,
    CONTAINER_SCRATCH,
    ENV_BEGIN,
    ENV_END,
    RunLayout,
    export_lines,
    task_env,
)
from launcher.spec import DEFAULT_TIME, REPO_ROOT, Job, ResolvedTask, is_local_host

NODE_EXEC = REPO_ROOT / "launcher" / "node_exec.sh"


def is_remote(job: Job) -> bool:
    """A Slurm job whose login host is another machine."""
    return job.kind == "slurm" and not is_local_host(job.tasks[0].slurm.host if job.tasks[0].slurm else None)


@dataclass
class BuiltTask:
    """A task ready for nemo_run: its executor, script object and the environment it gets."""

    task: ResolvedTask
    executor: Any
    script: Any
    env: dict[str, str]


def make_tunnel(run: Any, job: Job, task: ResolvedTask, layout: RunLayout) -> Any:
    """LocalTunnel when the Slurm host is this machine (commands by name from PATH), else SSHTunnel."""
    cfg = task.slurm
    assert cfg is not None
    if is_local_host(cfg.host):
        return run.LocalTunnel(job_dir=str(layout.local_experiments))
    return run.SSHTunnel(
        host=cfg.host,
        user=job.spec.user or getpass.getuser(),
        port=cfg.port,
        identity=job.spec.identity,
        job_dir=str(layout.cluster_experiments),
    )


def _dollars(text: str) -> str:
    """Escape `$` for nemo_run's string.Template pass over role args (`$$` -> `$`)."""
    return text.replace("$", "$$")


#: srun options for a streaming task with several serve nodes. nemo_run runs every task under
#: `srun --wait=60 --kill-on-bad-exit=1`: one serve node's script dying would kill the whole step, and a node
#: that ended would take the others down 60 s later; and Slurm ends a job (and its step) when one of its
#: nodes fails, unless told --no-kill. The entry script's own markers end the job instead (the failed
#: marker; trainers fail past data.server_grace_s with no server left).
SURVIVE_SERVE_LOSS_SRUN_ARGS = ("--kill-on-bad-exit=0", "--wait=0", "--no-kill")


def survives_serve_loss(task: ResolvedTask) -> bool:
    """Whether the task's job must outlive a lost serve node (process or whole host): streaming with >= 2
    servers, where the trainers fail over to the others."""
    return bool(task.plan.streaming and len(task.plan.serve_ids) >= 2)


def srun_args(task: ResolvedTask) -> list[str]:
    """The task's srun arguments: the survival options first for multi-server streaming, then the spec's
    own `srun_args` (srun takes the last of a repeated option, so the spec can override them)."""
    cfg = task.slurm
    assert cfg is not None
    own = list(cfg.srun_args)
    if survives_serve_loss(task):
        return [*SURVIVE_SERVE_LOSS_SRUN_ARGS, *own]
    return own


def build_slurm_task(run: Any, job: Job, task: ResolvedTask, layout: RunLayout) -> BuiltTask:
    """SlurmExecutor + Script for one task; the command is `bash node_exec.sh SCRIPT ARGS`."""
    cfg = task.slurm
    assert cfg is not None
    container = cfg.container is not None
    env = task_env(job, task, layout, container=container)
    mounts = list(cfg.container_mounts)
    setup = [
        "{ set +vx; } 2>/dev/null  # keep the environment (tokens) out of the job log",
        ENV_BEGIN,
        *export_lines(env),
        ENV_END,
        "set -vx",
        f"mkdir -p -- {shlex.quote(str(layout.cluster_scratch))}",
    ]
    if container:
        # The repo at the same path (MODELOPT_REPO), the run's scratch at /scratchspace, models at /hf-local.
        mounts += [f"{layout.repo_dir}:{layout.repo_dir}", f"{layout.cluster_scratch}:{CONTAINER_SCRATCH}"]
        if job.spec.hf_local:
            mounts.append(f"{job.spec.hf_local}:{CONTAINER_HF_LOCAL}")
    additional: dict[str, Any] = dict(cfg.additional_parameters)
    if cfg.requeue:
        additional["requeue"] = True
    if survives_serve_loss(task):
        additional.setdefault("no_kill", True)  # a failed node does not end the job (sbatch --no-kill)
    executor = run.SlurmExecutor(
        account=cfg.account,
        partition=cfg.partition,
        qos=cfg.qos,
        nodes=cfg.nodes,
        ntasks_per_node=cfg.ntasks_per_node,
        gpus_per_node=cfg.gpus_per_node or None,
        time=cfg.time or DEFAULT_TIME,
        mem=cfg.mem,
        array=cfg.array,
        segment=cfg.segment,
        container_image=cfg.container,
        container_mounts=mounts,
        srun_args=srun_args(task) or None,
        additional_parameters=additional or None,
        job_name_prefix=f"{job.name}-",
        setup_lines="\n".join(setup),
        tunnel=make_tunnel(run, job, task, layout),
        packager=run.Packager(),
        dependency_type="afterany" if job.spec.pipeline.allow_to_fail else "afterok",
        poll_estimated_start_time=False,
        retries=cfg.retries,
    )
    entry = f"bash {shlex.quote(layout.node_path(NODE_EXEC))}"
    if task.inline is not None:
        script = run.Script(inline=task.inline, entrypoint=entry)
    else:
        assert task.script is not None
        script = run.Script(
            path=shlex.quote(layout.node_path(task.script)),
            args=[_dollars(a) for a in task.args],
            entrypoint=entry,
        )
    return BuiltTask(task, executor, script, env)


def local_command(job: Job, task: ResolvedTask, layout: RunLayout) -> tuple[str, dict[str, str]]:
    """(bash text, env) the local executor runs: the same `bash node_exec.sh SCRIPT ARGS` as on Slurm."""
    env = task_env(job, task, layout, container=False)
    if task.inline is not None:
        text = (
            'cd -- "$MODELOPT_REPO" || exit 2\nmkdir -p -- "$MODELOPT_SCRATCH"\n'
            f"# --- task inline ---\n{task.inline}"
        )
    else:
        assert task.script is not None
        words = ["exec", "bash", shlex.quote(str(NODE_EXEC)), shlex.quote(str(task.script)), *task.args]
        text = " ".join(words) + "\n"
    return text, env


def build_local_task(run: Any, job: Job, task: ResolvedTask, layout: RunLayout) -> BuiltTask:
    """LocalExecutor + Script running `local_command` with the task's environment."""
    text, env = local_command(job, task, layout)
    return BuiltTask(task, run.LocalExecutor(packager=run.Packager()), run.Script(inline=text, env=env), env)


def local_command_text(job: Job, task: ResolvedTask, layout: RunLayout) -> str:
    """What the local executor runs, as one script (environment exports + command), for dry-run output."""
    text, env = local_command(job, task, layout)
    lines = ["#!/usr/bin/env bash", "# Runs on this machine through nemo_run's local executor.", ENV_BEGIN]
    lines += export_lines(env)
    lines += [ENV_END, text.rstrip("\n"), ""]
    return "\n".join(lines)
