"""The job spec: typed models for the YAML that `launch.py --yaml` reads.

Compatible with Model-Optimizer's launcher YAML (job_name, pipeline with global_vars and task_0..task_N or a
`tasks` list, tasks with script/inline, args, environment, slurm_config with `_factory_: slurm_factory`).
Extensions are typed fields: a task's `executor` (slurm|local), `serve_nodes`, `streaming`; the top-level
`repo_dir`. Pure pydantic: no nemo_run and no ML import here.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

_TASK_KEY = re.compile(r"^task_(\d+)$")


def task_number(key: Any) -> int | None:
    """N of a numbered pipeline key `task_N`, or None for any other key."""
    m = _TASK_KEY.match(key) if isinstance(key, str) else None
    return int(m.group(1)) if m else None


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Scalar = str | int | float | bool | None


def _scalar_to_str(value: Any) -> Any:
    """YAML turns `time: 30` or `mem: 0` into numbers; Slurm wants text. Leave other types to validation."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _scalars_to_str_list(value: Any) -> Any:
    """`args: [--steps, 5]` -> ['--steps', '5']; anything that is not a list is left for the type error."""
    if isinstance(value, list):
        return [_scalar_to_str(v) if not isinstance(v, bool) else str(v).lower() for v in value]
    return value


SlurmText = Annotated[str | None, BeforeValidator(_scalar_to_str)]
StrList = Annotated[list[str], BeforeValidator(_scalars_to_str_list)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SlurmConfig(_Strict):
    """Where and how a task runs on Slurm. Unset fields take the factory defaults (SLURM_* env vars)."""

    factory: Literal["slurm_factory"] = Field("slurm_factory", alias="_factory_")
    host: str | None = Field(None, description="Login host; empty/localhost/this machine = local tunnel.")
    port: int | None = Field(None, ge=1, le=65535, description="SSH port of `host`.")
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    container: str | None = Field(None, description="Container image (pyxis); none = run on the host.")
    container_mounts: list[str] = Field(default_factory=list, description="'src:dst[:flags]' items.")
    srun_args: list[str] = Field(default_factory=list, description="Extra srun arguments, one per item.")
    array: SlurmText = None
    requeue: bool | None = None
    retries: int = Field(0, ge=0, description="Requeue a failed job this many times (nemo_run's retries).")
    additional_parameters: dict[str, str | int | bool] = Field(
        default_factory=dict,
        description="Extra '#SBATCH --key=value' lines (key with _ or -; true = bare flag).",
    )
    nodes: int = Field(1, ge=1)
    ntasks_per_node: int = Field(1, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    time: SlurmText = Field(None, description="Wall-time limit (Slurm format); default 04:00:00.")
    mem: SlurmText = None
    segment: int | None = Field(None, ge=1, description="Nodes per topology segment (#SBATCH --segment).")

    @field_validator("time")
    @classmethod
    def _time_format(cls, v: str | None) -> str | None:
        if v is not None and not _SLURM_TIME.match(v):
            raise ValueError(
                f"{v!r} is not a Slurm time; allowed: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS"
            )
        return v

    @field_validator("srun_args")
    @classmethod
    def _one_word_each(cls, v: list[str]) -> list[str]:
        for i, arg in enumerate(v):
            if not arg or any(c.isspace() for c in arg):
                raise ValueError(
                    f"item [{i}] {arg!r} must be one word (it is passed to srun quoted); "
                    "write '--opt=value' or split it into two items"
                )
        return v

    @field_validator("additional_parameters")
    @classmethod
    def _sbatch_keys(cls, v: dict) -> dict:
        for key in v:
            if not re.match(r"^[a-z][a-z0-9_-]*$", key):
                raise ValueError(f"{key!r} is not an sbatch option name (e.g. mail_type, exclusive)")
        return v

    @field_validator("container_mounts")
    @classmethod
    def _mount_format(cls, v: list[str]) -> list[str]:
        for i, m in enumerate(v):
            parts = m.split(":")
            if len(parts) < 2 or not parts[0] or not parts[1]:
                raise ValueError(f"item [{i}] {m!r} must be 'src:dst' or 'src:dst:flags'")
        return v


class Task(_Strict):
    """One step of the pipeline: a script (path under the repo) or inline bash, and where it runs."""

    script: str | None = Field(None, description="Path of a bash script, relative to the repo root.")
    inline: str | None = Field(None, description="Bash text to run instead of a script.")
    args: StrList = Field(default_factory=list, description="Shell words appended to the script's command.")
    environment: dict[str, str] = Field(default_factory=dict, description="Env vars (list or mapping).")
    slurm_config: SlurmConfig | None = None
    executor: Literal["slurm", "local"] | None = Field(
        None,
        description="slurm (needs slurm_config) or local (this machine); default: slurm if slurm_config.",
    )
    serve_nodes: int | None = Field(
        None, ge=0, description="Nodes that serve hidden states (or SERVE_NODES)."
    )
    streaming: bool | None = Field(
        None, description="Serve+train task; default: script name has 'streaming'."
    )
    skip: bool = False

    @field_validator("environment", mode="before")
    @classmethod
    def _normalize_env(cls, v: Any) -> Any:
        """Model-Optimizer writes environment as a list of single-key dicts; a mapping is accepted too."""
        if v is None:
            return {}
        items: list[tuple[Any, Any]] = []
        if isinstance(v, list):
            for i, item in enumerate(v):
                if not isinstance(item, dict) or len(item) != 1:
                    raise ValueError(f"item [{i}] must be a single 'NAME: value' mapping (got {item!r})")
                items.extend(item.items())
        elif isinstance(v, dict):
            items = list(v.items())
        else:
            raise ValueError(  # noqa: TRY004 - pydantic reports ValueError as a field problem
                f"must be a list of 'NAME: value' items or a mapping (got {type(v).__name__})"
            )
        out: dict[str, str] = {}
        for key, value in items:
            if not isinstance(key, str) or not _ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
            if isinstance(value, list) and all(isinstance(x, (int, float, str)) for x in value):
                # `EAGLE_CAPTURE_IDS: [2,18,33,36]` (or the same as an override) means the text "[2,18,33,36]".
                value = "[" + ",".join(str(x) for x in value) + "]"
            if isinstance(value, (dict, list)):
                raise ValueError(f"{key}: value must be a scalar (got {type(value).__name__})")  # noqa: TRY004
            if isinstance(value, bool):
                value = str(value).lower()
            out[key] = "" if value is None else str(value)
        return out

    @model_validator(mode="after")
    def _script_xor_inline(self) -> Task:
        if bool(self.script) == bool(self.inline):
            raise ValueError("exactly one of 'script' or 'inline' is required")
        if self.inline and self.args:
            raise ValueError("'args' are only used with 'script' (put them in the inline text)")
        if self.executor == "local" and self.slurm_config is not None:
            raise ValueError("executor 'local' does not use 'slurm_config' (remove one of them)")
        if self.executor == "slurm" and self.slurm_config is None:
            raise ValueError("executor 'slurm' needs 'slurm_config'")
        return self

    @property
    def kind(self) -> Literal["slurm", "local"]:
        """The executor this task runs on."""
        if self.executor:
            return self.executor
        return "slurm" if self.slurm_config is not None else "local"


class Pipeline(_Strict):
    """Tasks run in order; each waits for the previous one (afterok, or afterany with allow_to_fail)."""

    global_vars: dict[str, Scalar] = Field(default_factory=dict)
    tasks: list[Task] | None = None
    # task_0..task_N keys are moved here before validation (see _collect_numbered_tasks); error paths
    # drop this name again so users see `pipeline.task_1...`.
    numbered_tasks: dict[str, Task] = Field(default_factory=dict, alias="__numbered_tasks__")
    allow_to_fail: bool = False
    skip: bool = False
    note: str | None = ""

    @model_validator(mode="before")
    @classmethod
    def _collect_numbered_tasks(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        numbered = {k: data.pop(k) for k in list(data) if task_number(k) is not None}
        if numbered:
            data["__numbered_tasks__"] = dict(sorted(numbered.items(), key=lambda kv: task_number(kv[0])))
        return data

    @model_validator(mode="after")
    def _one_task_style(self) -> Pipeline:
        if self.tasks is not None and self.numbered_tasks:
            raise ValueError("use either task_0..task_N keys or a 'tasks' list, not both")
        if not self.tasks and not self.numbered_tasks:
            raise ValueError("no tasks: add task_0 (and task_1, ...) or a 'tasks' list")
        return self

    def named_tasks(self) -> list[tuple[str, str, Task]]:
        """[(name, field path, task)] in run order: ('task_1', 'pipeline.task_1', ...) or tasks[i]."""
        if self.numbered_tasks:
            return [(k, f"pipeline.{k}", t) for k, t in self.numbered_tasks.items()]
        return [(f"task_{i}", f"pipeline.tasks[{i}]", t) for i, t in enumerate(self.tasks or [])]


class JobSpec(_Strict):
    """The whole YAML file."""

    job_name: str
    pipeline: Pipeline
    job_dir: str | None = Field(
        None, description="Where runs, logs and scratch go (shared storage on Slurm)."
    )
    user: str | None = Field(None, description="SSH user for a remote Slurm host.")
    identity: str | None = Field(None, description="SSH private key for a remote Slurm host.")
    detach: bool = False
    hf_local: str | None = Field(None, description="Host folder of local models, mounted at /hf-local.")
    repo_dir: str | None = Field(
        None, description="This repo's path on the cluster (default: this checkout)."
    )

    @field_validator("job_name")
    @classmethod
    def _job_name_chars(cls, v: str) -> str:
        if not _JOB_NAME.match(v):
            raise ValueError(
                f"{v!r} may only use letters, digits, '.', '_' and '-' (it names folders and jobs)"
            )
        return v

