"""Load a job spec: YAML + dotted overrides -> validated, interpolated, topology-checked `Job`.

Every problem is collected and raised at once as a ConfigError (one line each, naming the field path);
the CLI prints them and exits 2. Nothing here imports nemo_run or any ML package.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from launcher import contracts
from launcher import modelopt_compat as mo
from launcher.schema import JobSpec, Pipeline, SlurmConfig, Task
from launcher.topology import RolePlan, TopologyError, plan_roles
from modelopt_ext.config.overrides import apply_overrides, load_yaml_file
from modelopt_ext.util.errors import ConfigError, did_you_mean, problems_from_validation

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Factory defaults of `_factory_: slurm_factory`, as in Model-Optimizer's launcher.
FACTORY_ENV = {
    "host": "SLURM_HOST",
    "account": "SLURM_ACCOUNT",
    "partition": "SLURM_PARTITION",
    "qos": "SLURM_QOS",
    "mem": "SLURM_MEM",
}
DEFAULT_TIME = "04:00:00"

#: Variables the launcher sets for every task; a spec may not set them (SERVE_NODES is an input).
RESERVED_ENV = (
    "SERVE_NODE_IDS",
    "TRAIN_NODE_IDS",
    "TRAINER_SERVER_MAP",
    "SEGMENT_SIZE",
    "MODELOPT_SCRATCH",
    "MODELOPT_REPO",
    "MODELOPT_JOB_NAME",
    "MODELOPT_RUN_ID",
    "MODELOPT_TASK",
)

_GLOBAL_REF = re.compile(r"<<\s*global_vars\.([A-Za-z0-9_]+)\s*>>")
_INTERNAL_KEYS = {"__numbered_tasks__", "numbered_tasks"}


@dataclass
class ResolvedTask:
    """One task after interpolation and topology checks; what executors are built from."""

    name: str
    path: str
    task: Task
    plan: RolePlan
    env: dict[str, str]
    args: list[str]
    inline: str | None
    script: Path | None
    slurm: SlurmConfig | None = None

    @property
    def kind(self) -> str:
        """'slurm' or 'local'."""
        return self.task.kind

    @property
    def streaming(self) -> bool:
        """Serve+train task (needs a role plan with serve nodes)."""
        return self.plan.streaming


@dataclass
class Job:
    """A validated job spec, ready to render or submit."""

    spec: JobSpec
    source: str
    tasks: list[ResolvedTask] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The spec's job_name."""
        return self.spec.job_name

    @property
    def kind(self) -> str:
        """'slurm' or 'local' (a pipeline uses one executor kind)."""
        return self.tasks[0].kind if self.tasks else "local"


def load_job(
    path: str | os.PathLike,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    repo_root: Path = REPO_ROOT,
) -> Job:
    """Read, override, validate and resolve a job spec; raise ConfigError listing every problem."""
    source = str(path)
    data = load_yaml_file(source)
    data = apply_overrides(data, list(overrides))
    return resolve(
        data, source=source, environ=os.environ if environ is None else environ, repo_root=repo_root
    )


def is_local_host(host: str | None) -> bool:
    """True when Slurm commands run on this machine (LocalTunnel) rather than over SSH."""
    if not host:
        return True
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    return host in names


@dataclass
class _Pipeline:
    """What contract checks carry from one task to the next (the run's order)."""

    spec: JobSpec | None
    check: bool = True
    produced: list[Path] = field(default_factory=list)
    earlier: int = 0


def resolve(data: dict, *, source: str, environ: Mapping[str, str], repo_root: Path = REPO_ROOT) -> Job:
    """Validate a spec mapping (after overrides) and resolve it into a Job."""
    data = _with_factory_defaults(data, environ)
    problems: list[str] = []
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        problems = _problems(err)
        # Unknown keys must not hide the other problems: validate again without them.
        stripped = _without_unknown_keys(data, err)
        try:
            spec = JobSpec.model_validate(stripped)
        except ValidationError:
            # Report the semantic problems of the tasks that are well-formed too, so one run shows everything.
            state = _Pipeline(spec=None)
            for fpath, raw_task, gvars in _raw_tasks(stripped):
                try:
                    task = Task.model_validate(raw_task)
                except ValidationError:
                    continue
                if not task.skip:
                    _resolve_task(fpath.rsplit(".", 1)[-1], fpath, task, gvars, repo_root, problems, state)
            raise ConfigError(_unique(problems), source=source) from None
    job = Job(spec=spec, source=source)
    gvars = _global_vars(spec.pipeline.global_vars)
    # Tasks that never run (pipeline.skip) are not checked against their scripts' contracts.
    state = _Pipeline(spec=spec, check=not spec.pipeline.skip)
    for name, fpath, task in spec.pipeline.named_tasks():
        if task.skip:
            job.skipped.append(name)
            continue
        resolved = _resolve_task(name, fpath, task, gvars, repo_root, problems, state)
        if resolved is not None:
            job.tasks.append(resolved)
    kinds = {t.kind for t in job.tasks}
    if len(kinds) > 1:
        problems.append(
            "pipeline: mixes local and slurm tasks; a pipeline runs on one executor kind "
            f"(local: {', '.join(t.name for t in job.tasks if t.kind == 'local')}; "
            f"slurm: {', '.join(t.name for t in job.tasks if t.kind == 'slurm')})"
        )
    hosts = {t.slurm.host or "localhost" for t in job.tasks if t.slurm is not None}
    if len(hosts) > 1:
        problems.append(
            "pipeline: tasks submit to different Slurm hosts "
            f"({', '.join(f'{t.path}.slurm_config.host={t.slurm.host!r}' for t in job.tasks if t.slurm)}); "
            "a pipeline's tasks chain by job id on one cluster"
        )
    if not job.tasks and not problems and not spec.pipeline.skip:
        problems.append("pipeline: every task has skip: true; nothing to run")
    if problems:
        raise ConfigError(_unique(problems), source=source)
    return job


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def _without_unknown_keys(data: Any, err: ValidationError) -> Any:
    """A copy of the spec mapping without the keys pydantic reported as unknown (paths as in the YAML)."""
    import copy

    out = copy.deepcopy(data)
    for e in err.errors(include_url=False):
        if e["type"] != "extra_forbidden":
            continue
        node: Any = out
        loc = [p for p in e["loc"] if p not in _INTERNAL_KEYS]
        for part in loc[:-1]:
            in_dict = isinstance(node, dict) and part in node
            in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
            if in_dict or in_list:
                node = node[part]
            else:
                node = None
                break
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return out


def _global_vars(raw: Any) -> dict[str, str]:
    """global_vars as text (YAML booleans as true/false, null as empty)."""
    if not isinstance(raw, dict):
        return {}
    return {
        str(k): ("" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
        for k, v in raw.items()
        if not isinstance(v, (dict, list))
    }


def _raw_tasks(data: Any) -> list[tuple[str, Any, dict[str, str]]]:
    """[(field path, raw task mapping, global vars)] from an unvalidated spec mapping."""
    pipeline = data.get("pipeline") if isinstance(data, dict) else None
    if not isinstance(pipeline, dict):
        return []
    gvars = _global_vars(pipeline.get("global_vars"))
    out = [
        (f"pipeline.{k}", v, gvars)
        for k, v in pipeline.items()
        if isinstance(k, str) and re.match(r"^task_\d+$", k)
    ]
    if isinstance(pipeline.get("tasks"), list):
        out += [(f"pipeline.tasks[{i}]", v, gvars) for i, v in enumerate(pipeline["tasks"])]
    return out


def _with_factory_defaults(data: dict, environ: Mapping[str, str]) -> dict:
    """Fill unset slurm_config fields from SLURM_HOST/ACCOUNT/PARTITION/QOS/MEM (slurm_factory defaults)."""
    pipeline = data.get("pipeline")
    if not isinstance(pipeline, dict):
        return data
    task_dicts: list[Any] = [
        v for k, v in pipeline.items() if isinstance(k, str) and re.match(r"^task_\d+$", k)
    ]
    if isinstance(pipeline.get("tasks"), list):
        task_dicts.extend(pipeline["tasks"])
    for t in task_dicts:
        if isinstance(t, dict) and isinstance(t.get("slurm_config"), dict):
            cfg = t["slurm_config"]
            for key, var in FACTORY_ENV.items():
                if cfg.get(key) is None and environ.get(var):
                    cfg[key] = environ[var]
    return data


def _problems(err: ValidationError) -> list[str]:
    """One line per pydantic error, with `pipeline.task_N` paths and did-you-mean for unknown keys."""

    def task_keys(owner):
        # Pipeline accepts task_0..task_N by pattern, not as declared fields.
        return ([f"task_{i}" for i in range(10)], ["task_0..task_N"]) if owner is Pipeline else ([], [])

    def hint(owner, key):
        return mo.slurm_key_hint(key) if owner is SlurmConfig else None

    return problems_from_validation(err, JobSpec, hidden=_INTERNAL_KEYS, extra_choices=task_keys, key_hint=hint)


def _interpolate(text: str, gvars: dict[str, str], where: str, problems: list[str]) -> str:
    """Replace <<global_vars.X>>; an unknown X is a problem naming `where`."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key in gvars:
            return gvars[key]
        defined = ", ".join(sorted(gvars)) or "none"
        problems.append(
            f"{where}: unknown global var '{key}' in {m.group(0)!r}{did_you_mean(key, gvars)}; "
            f"defined in pipeline.global_vars: {defined}"
        )
        return m.group(0)

    return _GLOBAL_REF.sub(sub, text)


def _resolve_task(
    name: str,
    fpath: str,
    task: Task,
    gvars: dict[str, str],
    repo_root: Path,
    problems: list[str],
    state: _Pipeline,
) -> ResolvedTask | None:
    start = len(problems)
    args = [_interpolate(a, gvars, f"{fpath}.args[{i}]", problems) for i, a in enumerate(task.args)]
    env = {
        k: _interpolate(v, gvars, f"{fpath}.environment.{k}", problems) for k, v in task.environment.items()
    }
    inline = _interpolate(task.inline, gvars, f"{fpath}.inline", problems) if task.inline else None
    for key in env:
        if key in RESERVED_ENV:
            problems.append(f"{fpath}.environment.{key}: set by the launcher for every task; remove it")

    script: Path | None = None
    if task.script:
        p = Path(task.script)
        script = p if p.is_absolute() else repo_root / p
        try:
            found = script.is_file()
        except OSError as e:  # e.g. a name too long for the filesystem (is_file only absorbs "not found")
            problems.append(f"{fpath}.script: unusable path ({e.strerror}): {task.script[:80]!r}")
        else:
            if not found:
                hint = mo.script_hint(task.script)
                problems.append(
                    f"{fpath}.script: {hint}"
                    if hint
                    else f"{fpath}.script: file not found: {task.script} (relative to the repo root {repo_root})"
                )

    slurm = task.slurm_config
    nodes = slurm.nodes if slurm else 1
    segment = slurm.segment if slurm else None
    gpus = slurm.gpus_per_node if slurm else None
    streaming = (
        task.streaming
        if task.streaming is not None
        else bool(task.script and "streaming" in Path(task.script).name)
    )

    serve_field = f"{fpath}.serve_nodes"
    serve = task.serve_nodes
    if "SERVE_NODES" in env:
        raw = env["SERVE_NODES"].strip()
        if not raw.isdigit():
            problems.append(f"{fpath}.environment.SERVE_NODES: must be a whole number (got {raw!r})")
        else:
            if serve is not None and serve != int(raw):
                problems.append(
                    f"{fpath}.serve_nodes: {serve} disagrees with environment.SERVE_NODES={raw}; set only one"
                )
            serve = int(raw)
            serve_field = f"{fpath}.environment.SERVE_NODES"
    if streaming and slurm and slurm.ntasks_per_node != 1:
        problems.append(
            f"{fpath}.slurm_config.ntasks_per_node: a streaming task runs one entry script per node "
            f"(it starts its own ranks); allowed: 1 (got {slurm.ntasks_per_node})"
        )
    plan = RolePlan(nodes, (), tuple(range(nodes)))
    try:
        plan = plan_roles(nodes, serve, segment=segment, gpus_per_node=gpus, streaming=streaming)
    except TopologyError as e:
        where = {
            "segment": f"{fpath}.slurm_config.segment",
            "nodes": f"{fpath}.slurm_config.nodes",
            "gpus_per_node": f"{fpath}.slurm_config.gpus_per_node",
            "serve_nodes": serve_field,
        }[e.field]
        problems.append(f"{where}: {e}")
    if state.check:
        _check_contract(fpath, task, args, env, script, state, problems)
    state.earlier += 1
    if len(problems) > start:
        return None
    return ResolvedTask(
        name=name,
        path=fpath,
        task=task,
        plan=plan,
        env=env,
        args=args,
        inline=inline,
        script=script,
        slurm=slurm,
    )


def _check_contract(
    fpath: str,
    task: Task,
    args: list[str],
    env: dict[str, str],
    script: Path | None,
    state: _Pipeline,
    problems: list[str],
) -> None:
    """Check a task against its entry script's contract (launcher/contracts.py); record what it writes."""
    if script is None or contracts.entry_script(script) is None:
        return
    slurm = task.slurm_config
    spec = state.spec
    container = bool(slurm and slurm.container)
    repo_dir = spec.repo_dir if spec and spec.repo_dir and task.kind == "slurm" else str(REPO_ROOT)
    mounts: list[tuple[str, str]] = []
    if container and slurm:
        mounts = [(m.split(":")[1], m.split(":")[0]) for m in slurm.container_mounts]
        if spec and spec.hf_local:
            mounts.append((contracts.CONTAINER_HF_LOCAL, spec.hf_local))
    view = contracts.TaskView(
        path=fpath,
        args=args,
        env=env,
        nodes=slurm.nodes if slurm else 1,
        gpus_per_node=slurm.gpus_per_node if slurm else None,
        container=container,
        mounts=mounts,
        repo_dir=repo_dir,
        files_visible=task.kind == "local" or is_local_host(slurm.host if slurm else None),
        has_earlier=state.earlier > 0,
        produced=list(state.produced),
    )
    contracts.check_task(view, script)
    problems.extend(view.problems)
    state.produced.extend(view.outputs)
