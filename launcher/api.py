"""`run_job`: the launcher as a library (launch.py is a thin CLI over it; tests call it directly).

    result = run_job("examples/local/slurm_streaming_eagle3.yaml", ["pipeline.task_0.slurm_config.nodes=3"],
                     mode="submit", job_dir=tmp_path, run_id="t1")
    result.tasks[0].job_id, result.tasks[0].submitted_script, result.tasks[0].script_text

Modes: "validate" (spec + plan only, no nemo_run import), "dryrun" (render the exact scripts, submit
nothing), "submit" (Slurm: sbatch through nemo_run, then follow unless detached; local: run on this
machine). Bad specs raise ConfigError; failures to submit raise LaunchError (one line each).
"""

from __future__ import annotations

import inspect
import os
import shutil
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from launcher.executors import (
    build_local_task,
    build_slurm_task,
    is_remote,
    local_command_text,
)
from launcher.follow import JobState, follow, local_runner, tunnel_runner
from launcher.layout import RunLayout, make_layout
from launcher.nemo import dryrun_script, experiment_dir, import_nemo_run, reset_packaging
from launcher.spec import Job, ResolvedTask, load_job
from modelopt_ext.util.fileio import write_text_atomic

Mode = Literal["validate", "dryrun", "submit"]
Printer = Callable[[str], None]


class LaunchError(RuntimeError):
    """Submission or execution could not proceed; the message is one line for the user."""


@dataclass
class TaskResult:
    """What happened to one task (fields fill in as far as the mode goes)."""

    name: str
    kind: str
    plan: list[str]
    env: dict[str, str]
    script_text: str | None = None
    dryrun_script: Path | None = None
    submitted_script: Path | None = None
    sbatch_command: str | None = None
    job_id: str | None = None
    state: str | None = None
    exit_code: str | None = None
    reason: str | None = None
    log_paths: list[str] = field(default_factory=list)
    matches_dryrun: bool | None = None
    inline_script: tuple[str, str] | None = None  # (path on the nodes, text) for inline Slurm tasks

    @property
    def ok(self) -> bool:
        """Finished successfully."""
        return self.state in ("COMPLETED", "SUCCEEDED", "SKIPPED")


@dataclass
class RunResult:
    """The outcome of `run_job`."""

    job: Job
    mode: str
    layout: RunLayout
    tasks: list[TaskResult]
    detached: bool = False

    @property
    def run_id(self) -> str:
        """The run's id (folder name under <job_dir>/<job_name>/)."""
        return self.layout.run_id

    @property
    def dryrun_dir(self) -> Path:
        """Folder holding the rendered scripts."""
        return self.layout.dryrun_dir

    @property
    def scratch_dir(self) -> str:
        """MODELOPT_SCRATCH's host path."""
        return str(self.layout.cluster_scratch)

    @property
    def job_ids(self) -> dict[str, str]:
        """task name -> Slurm job id (submitted tasks only)."""
        return {t.name: t.job_id for t in self.tasks if t.job_id}

    @property
    def ok(self) -> bool:
        """Every task succeeded (a dry run or a detached submit counts as ok)."""
        if self.mode != "submit" or self.detached:
            return True
        return all(t.ok for t in self.tasks)


def run_job(
    spec_path: str | os.PathLike,
    overrides: Iterable[str] = (),
    mode: Mode = "dryrun",
    *,
    detach: bool | None = None,
    job_dir: str | os.PathLike | None = None,
    run_id: str | None = None,
    environ: Mapping[str, str] | None = None,
    echo: Printer | None = None,
    poll_s: float = 0.5,
    follow_timeout_s: float | None = None,
) -> RunResult:
    """Validate a job spec and dry-run, submit or run it. `echo` receives progress lines (default: none)."""
    say = echo or (lambda _line: None)
    job = load_job(spec_path, overrides, environ=environ)
    layout = make_layout(job, remote=is_remote(job), job_dir=job_dir, run_id=run_id, environ=environ)
    results = [TaskResult(t.name, t.kind, t.plan.describe(), {}) for t in job.tasks]
    result = RunResult(job, mode, layout, results)
    if mode == "validate":
        return result
    if job.spec.pipeline.skip:
        say("pipeline.skip is true: nothing to run")
        for r in result.tasks:
            r.state = "SKIPPED"
        return result
    with _stdin_devnull(), _main_without_source():
        if job.kind == "local":
            _local(job, layout, result, mode, say)
        else:
            detached = detach if detach is not None else job.spec.detach
            _slurm(job, layout, result, mode, detached, say, poll_s, follow_timeout_s)
    return result


@contextmanager
def _main_without_source():
    """nemo_run saves the source of `__main__` with every experiment and fails (OSError) when there is none:
    `python -` (stdin), `python -c`, some REPLs. It skips a `__main__` without a file (TypeError), so such a
    `__main__` is swapped for a bare module while nemo_run runs."""
    main = sys.modules.get("__main__")
    try:
        if main is not None:
            inspect.getsource(main)
        missing = False
    except TypeError:  # no file at all: nemo_run skips it
        missing = False
    except OSError:  # a file name without a readable source ('<stdin>', '<string>')
        missing = True
    if not missing:
        yield
        return
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


@contextmanager
def _stdin_devnull():
    """nemo_run runs commands through invoke, which mirrors sys.stdin into them (and fails under pytest's
    captured stdin); the launcher never feeds them input, so they get /dev/null."""
    saved = sys.stdin
    with open(os.devnull) as null:
        sys.stdin = null
        try:
            yield
        finally:
            sys.stdin = saved


def _experiment(run, title: str, exp_id: str, base_dir: Path):
    return run.Experiment(
        title,
        id=exp_id,
        base_dir=str(base_dir),
        clean_mode=True,
        enable_goodbye_message=False,
        skip_status_at_exit=True,
        log_level="WARN",
    )


# ---------------------------------------------------------------------------------------------- Slurm


def _job_id(handle: str) -> str:
    """'slurm_tunnel://nemo_run/12345/...' -> '12345' (the same parsing nemo_run uses for dependencies)."""
    return handle.partition("://")[2].split("/")[1]


def _slurm(
    job: Job,
    layout: RunLayout,
    result: RunResult,
    mode: Mode,
    detach: bool,
    say: Printer,
    poll_s: float,
    follow_timeout_s: float | None,
) -> None:
    if layout.local_experiment_dir.exists():
        raise LaunchError(f"run id {layout.run_id!r} was already used: {layout.local_experiment_dir} exists")
    run = import_nemo_run(layout.nemorun_home)
    built = [build_slurm_task(run, job, t, layout) for t in job.tasks]
    exp = _experiment(run, job.name, layout.experiment_id, layout.local_root)
    with exp:
        prev = None
        for b in built:
            prev = exp.add(
                b.script, executor=b.executor, name=b.task.name, dependencies=[prev] if prev else None
            )
        exp.dryrun(log=False, delete_exp_dir=False)
        for i, (b, r) in enumerate(zip(built, result.tasks)):
            jobobj = exp.jobs[i]
            r.env = b.env
            r.script_text = dryrun_script(jobobj)
            r.dryrun_script = layout.dryrun_dir / f"{b.task.name}.sbatch.sh"
            write_text_atomic(r.dryrun_script, r.script_text)
            if b.task.inline is not None:
                # nemo_run runs inline text from a file in the task folder; show and keep it too.
                inline_file = Path(jobobj.executor.job_dir) / "scripts" / f"{b.task.name}.sh"
                r.inline_script = (str(inline_file), inline_file.read_text())
                write_text_atomic(layout.dryrun_dir / f"{b.task.name}.inline.sh", r.inline_script[1])
            r.submitted_script = (
                Path(jobobj.executor.tunnel.job_dir) / f"{jobobj.executor.job_name}_sbatch.sh"
            )
            dep = (
                ""
                if i == 0
                else f" --dependency={b.executor.dependency_type}:<job id of {built[i - 1].task.name}>"
            )
            r.sbatch_command = f"sbatch --requeue --parsable{dep} {r.submitted_script}"
        shutil.rmtree(experiment_dir(exp), ignore_errors=True)  # what exp.dryrun(delete_exp_dir=True) does
        if mode == "dryrun":
            return
        # exp.run renders again into a fresh experiment folder; let its packaging step run again too.
        reset_packaging(exp)
        try:
            exp.run(detach=True)
        except Exception as e:  # noqa: BLE001 - invoke/torchx errors carry sbatch's stderr; report one line
            submitted = [j for j in exp.jobs if getattr(j, "handle", None)]
            _cancel([_job_id(j.handle) for j in submitted], exp, built)
            if not submitted:  # nothing reached Slurm: free the run id again
                shutil.rmtree(experiment_dir(exp), ignore_errors=True)
            raise LaunchError(f"submission failed: {_one_line(e)}") from None
    runner = local_runner if not is_remote(job) else tunnel_runner(next(iter(exp.tunnels.values())))
    for i, (b, r) in enumerate(zip(built, result.tasks)):
        jobobj = exp.jobs[i]
        r.job_id = _job_id(jobobj.handle)
        details = jobobj.executor.job_details
        r.log_paths = [
            str(details.stdout).replace("%j", r.job_id),
            str(details.srun_stdout).replace("%j", r.job_id).replace("${SLURM_RESTART_COUNT:-0}", "0"),
        ]
        local_copy = layout.local_experiment_dir / r.submitted_script.name
        if local_copy.exists():
            r.matches_dryrun = local_copy.read_text() == r.script_text
        r.state = "SUBMITTED"
        say(f"submitted {r.name}: job {r.job_id}")
    result.detached = detach
    if detach:
        return
    limit = follow_timeout_s if follow_timeout_s is not None else _time_budget(job)
    by_id = {r.job_id: r for r in result.tasks if r.job_id}

    def changed(st: JobState) -> None:
        say(
            f"{by_id[st.job_id].name} (job {st.job_id}): {st.state}"
            + (f" [{st.reason}]" if st.reason and st.reason != "None" else "")
        )

    final = follow(list(by_id), runner=runner, poll_s=poll_s, timeout_s=limit, on_change=changed)
    for jid, st in final.items():
        r = by_id[jid]
        r.state, r.exit_code, r.reason = st.state, st.exit_code, st.reason
        if not r.ok and r.state != "NOT_RUN" and not is_remote(job):
            last = _last_line(Path(r.log_paths[-1]))  # the task's own output says best why it failed
            if last:
                r.reason = last


def _time_budget(job: Job) -> float:
    """Follow at most the sum of the tasks' time limits plus 15 minutes of queueing slack."""
    total = 0
    for t in job.tasks:
        total += _slurm_seconds(t.slurm.time if t.slurm and t.slurm.time else "04:00:00")
    return total + 900


def _slurm_seconds(text: str) -> int:
    days = 0
    if "-" in text:
        d, _, text = text.partition("-")
        days = int(d)
        parts = [int(p) for p in text.split(":")] + [0, 0]
        h, m, s = parts[0], parts[1], parts[2]
        return days * 86400 + h * 3600 + m * 60 + s
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def _cancel(job_ids: list[str], exp, built) -> None:
    if not job_ids:
        return
    try:
        runner = tunnel_runner(next(iter(exp.tunnels.values()))) if exp.tunnels else local_runner
        runner(["scancel", *job_ids])
    except Exception:  # noqa: BLE001, S110 - best effort: the submission error is what gets reported
        pass


def _one_line(e: BaseException) -> str:
    result = getattr(e, "result", None)
    text = (getattr(result, "stderr", "") or "").strip() or str(e).strip() or type(e).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------- local


def _local(job: Job, layout: RunLayout, result: RunResult, mode: Mode, say: Printer) -> None:
    for t, r in zip(job.tasks, result.tasks):
        r.script_text = local_command_text(job, t, layout)
        r.dryrun_script = layout.dryrun_dir / f"{t.name}.local.sh"
        write_text_atomic(r.dryrun_script, r.script_text)
    if mode == "dryrun":
        return
    for t in job.tasks:
        used = layout.local_experiments / job.name / f"{layout.experiment_id}.{t.name}"
        if used.exists():
            raise LaunchError(f"run id {layout.run_id!r} was already used: {used} exists")
    run = import_nemo_run(layout.nemorun_home)
    failed = None
    for t, r in zip(job.tasks, result.tasks):
        if failed is not None and not job.spec.pipeline.allow_to_fail:
            r.state, r.reason = "NOT_RUN", f"{failed} failed"
            continue
        _run_local_task(run, job, t, r, layout, say)
        if not r.ok:
            failed = t.name


def _run_local_task(run, job: Job, t: ResolvedTask, r: TaskResult, layout: RunLayout, say: Printer) -> None:
    built = build_local_task(run, job, t, layout)
    r.env = built.env
    exp = _experiment(run, job.name, f"{layout.experiment_id}.{t.name}", layout.local_root)
    say(f"running {t.name} on this machine (local executor)")
    stop = threading.Event()
    tail = threading.Thread(target=_tail_logs, args=(layout, exp, t.name, say, stop, r), daemon=True)
    try:
        with exp:
            exp.add(built.script, executor=built.executor, name=t.name)
            tail.start()
            exp.run(detach=False)
    except Exception as e:  # noqa: BLE001 - nemo_run failed before or while starting the task: one line
        stop.set()
        if tail.is_alive():
            tail.join(timeout=10)
        if not r.log_paths:  # nothing ran: free the run id again
            shutil.rmtree(experiment_dir(exp), ignore_errors=True)
        raise LaunchError(f"{t.name}: could not run it locally: {_one_line(e)}") from None
    stop.set()
    tail.join(timeout=10)
    state = getattr(exp.jobs[0].state, "name", str(exp.jobs[0].state))
    r.state = state
    if r.log_paths and r.state != "SUCCEEDED":
        last = _last_line(Path(r.log_paths[0]))
        if last:
            r.reason = last


def _tail_logs(layout: RunLayout, exp, name: str, say: Printer, stop: threading.Event, r: TaskResult) -> None:
    """Echo the task's combined log while it runs (nemo_run's local executor writes it under the task dir)."""
    task_dir = experiment_dir(exp) / name
    pos, path = 0, None
    while True:
        finished = stop.is_set()
        if path is None:
            found = sorted(task_dir.glob(f"nemo_run/*/{name}/*/combined.log"))
            if found:
                path = found[-1]
                r.log_paths = [str(path)]
        if path is not None and path.exists():
            with open(path, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            for line in chunk.splitlines():
                say(f"  | {line}")
        if finished:
            return
        time.sleep(0.3)


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""
