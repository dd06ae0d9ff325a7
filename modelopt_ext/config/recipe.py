"""The training recipe: what to train, on which data, with which hyper-parameters.

A recipe is YAML plus dotted CLI overrides, validated here into typed objects. Bad recipes report every
problem at once, one line each, naming the field path (see `errors.py`); the CLI exits with code 2.
No torch import here: the launcher validates recipes before anything is submitted.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from modelopt_ext.config.overrides import apply_overrides, load_yaml_file
from modelopt_ext.drafters import BUILTIN, DEFAULT_DRAFTER, UnknownDrafter, builtin_drafters, resolve_drafter
from modelopt_ext.targets.layers import check_id_list
from modelopt_ext.util.errors import ConfigError, key_problem, problems_from_validation

DataMode = Literal["colocated", "offline", "hybrid", "streaming", "remote"]
Dtype = Literal["float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The frozen target model."""

    path: str = Field(
        description="Target model: a local folder with config.json, or a hub id in the local HF cache "
        "(checked by modelopt_ext.targets.locate.resolve_target; nothing is downloaded)."
    )
    dtype: Dtype = "bfloat16"
    aux_layer_ids: list[int] | None = Field(
        default=None,
        description=(
            "Target layers whose hidden states feed the drafter, in vLLM's numbering: id k is the residual "
            "stream after k decoder layers (0 = embeddings). Default: the drafter's rule (drafters/layers.py)."
        ),
    )
    trust_remote_code: bool = False

    @field_validator("aux_layer_ids")
    @classmethod
    def _check_aux(cls, v: list[int] | None) -> list[int] | None:
        return v if v is None else check_id_list(v)


class DataConfig(_Strict):
    """Training conversations and where the supervision comes from (the source mode)."""

    path: str = Field(description="Conversations JSONL (ShareGPT `conversations` or OpenAI `messages`).")
    chat_template: str | None = Field(
        default=None,
        description="A Jinja chat template (inline or a path to a .jinja file); default: the tokenizer's.",
    )
    max_length: int = Field(default=2048, gt=1)
    strict: bool = Field(default=False, description="Fail on malformed lines instead of skipping them.")
    cache_dir: str | None = Field(default=None, description="Tokenisation cache; default: <output_dir>/cache.")
    mode: DataMode | None = Field(default=None, description="Derived from the configured source when omitted.")
    offline_dir: str | None = Field(
        default=None,
        description=(
            "A supervision dump (python -m modelopt_ext.dump; docs/offline.md). Alone: train from it (offline). "
            "With data.server_urls: hybrid, the first epoch streams and fills it, later epochs read it."
        ),
    )
    offline_dtype: Literal["bfloat16", "float32"] = Field(
        default="bfloat16", description="Hybrid: the dtype hidden states are stored in."
    )
    server_urls: list[str] = Field(default_factory=list)
    shared_storage_root: str | None = Field(
        default=None, description="Streaming: hidden-state files must resolve inside this folder."
    )
    auth_token_file: str | None = Field(
        default=None, description="Bearer token for the servers, read from a file."
    )
    num_workers: int = Field(
        default=0, ge=0, description="DataLoader workers (fetch concurrency when streaming)."
    )
    call_ahead: int = Field(
        default=1,
        ge=0,
        le=8,
        description="Remote mode: batches whose supervision is fetched while the step before trains (their "
        "hidden states wait in the trainer's memory); 0 fetches inside the step.",
    )
    server_grace_s: float = Field(
        default=120.0,
        ge=0,
        description="No hidden-state server healthy for this long ends training (a restarting server fits in it).",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "server_url" in data:
            url = data.pop("server_url")
            if url:
                urls = list(data.get("server_urls") or [])
                data["server_urls"] = urls + [u for u in str(url).split(",") if u and u not in urls]
        if "streaming_prefetch" in data:
            data.pop("streaming_prefetch")
            warnings.warn(
                "data.streaming_prefetch is deprecated and ignored; fetch concurrency is data.num_workers",
                DeprecationWarning,
                stacklevel=2,
            )
        return data

    @model_validator(mode="after")
    def _derive_mode(self) -> DataConfig:
        derived: DataMode
        if self.offline_dir and self.server_urls:
            if self.mode == "remote":
                raise ValueError("data.offline_dir with data.server_urls is hybrid mode (vLLM servers), not remote")
            derived = "hybrid"
        elif self.offline_dir:
            derived = "offline"
        elif self.server_urls:
            derived = "remote" if self.mode == "remote" else "streaming"
        else:
            derived = "colocated"
        if self.mode is not None and self.mode != derived:
            need = {
                "offline": "data.offline_dir and no server_urls",
                "hybrid": "data.offline_dir and data.server_urls",
                "streaming": "data.server_urls",
                "remote": "data.server_urls",
                "colocated": "no offline_dir and no server_urls",
            }[self.mode]
            raise ValueError(
                f"mode is {self.mode!r} but the configured source is {derived!r}; {self.mode} needs {need}"
            )
        object.__setattr__(self, "mode", derived)
        return self


class TrainingConfig(_Strict):
    """Optimisation, checkpoints and logging."""

    output_dir: str
    lr: float = Field(default=1e-4, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    max_steps: int | None = Field(default=None, gt=0, description="Optimizer steps; overrides epochs.")
    epochs: int = Field(default=1, gt=0)
    batch_size: int = Field(default=1, gt=0, description="Per-device micro-batch.")
    grad_accum: int = Field(default=1, gt=0)
    max_grad_norm: float | None = Field(default=0.5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0
    save_interval: int = Field(default=500, gt=0, description="Save a checkpoint every N optimizer steps.")
    log_interval: int = Field(default=10, gt=0)
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="auto: fp32 on CPU, bf16 autocast on GPU."
    )
    export_at_end: bool = True
    compile: bool = Field(
        default=False, description="torch.compile the draft step and loss (first steps pay the compile time)."
    )


class Recipe(_Strict):
    """A whole recipe. The drafter's own settings live under its section key (e.g. `eagle:` for EAGLE-3)
    and arrive here validated as `drafter_settings` (see `parse_recipe`)."""

    model: ModelConfig
    data: DataConfig
    drafter: str = Field(
        default=DEFAULT_DRAFTER,
        description=f"Which drafter to train: {', '.join(sorted(BUILTIN))}, or package.module:Attribute "
        "(docs/drafters.md). Its settings go under its own section.",
    )
    drafter_settings: Any = Field(default=None, exclude=True)
    training: TrainingConfig

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        out = handler(self)
        section = resolve_drafter(self.drafter).section
        settings = self.drafter_settings
        out[section] = settings.model_dump(mode="json") if isinstance(settings, BaseModel) else settings
        return out


_SECRET_WORDS = ("token", "secret", "password", "api_key", "apikey", "credential")


def redacted(obj: Any) -> Any:
    """A copy safe to print: values under secret-looking keys are masked (file paths to secrets are kept)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = str(k)
            low = key.lower()
            secret = any(w in low for w in _SECRET_WORDS) and not low.endswith(("_file", "_path"))
            out[key] = "***" if secret and v not in (None, "") else redacted(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [redacted(v) for v in obj]
    return obj


def parse_recipe(data: dict, source: str | None = None) -> Recipe:
    """Validate a recipe mapping; raise ConfigError with every problem at once.

    The `drafter:` value picks the drafter; its section (e.g. `eagle:`) is validated by the drafter's own
    schema; another built-in drafter's section is a mistake worth a line (a recipe copied across kinds).
    """
    data = dict(data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ConfigError([f"recipe: expected a mapping, got {type(data).__name__}"], source=source)
    problems: list[str] = []
    try:
        drafter = resolve_drafter(data.get("drafter"))
    except UnknownDrafter as e:
        raise ConfigError([f"drafter: {e}"], source=source) from None
    if "drafter_settings" in data:
        problems.append(f"drafter_settings: not a recipe key; the drafter's settings go under `{drafter.section}:`")
        data.pop("drafter_settings")
    for other in builtin_drafters():
        if other.section != drafter.section and other.section in data:
            data.pop(other.section)
            problems.append(
                f"{other.section}: settings of the {other.name} drafter, but drafter is {drafter.name} "
                f"(its settings go under `{drafter.section}:`)"
            )
    section = data.pop(drafter.section, None)
    with warnings.catch_warnings():
        warnings.simplefilter("always", DeprecationWarning)
        try:
            data["drafter_settings"] = drafter.Settings.model_validate(section or {})
        except ValidationError as e:
            problems += problems_from_validation(e, drafter.Settings, prefix=drafter.section)
        try:
            recipe = Recipe.model_validate(data)
        except ValidationError as e:
            problems += problems_from_validation(
                e, Recipe, extra_choices=lambda owner: ([drafter.section], [drafter.section]) if owner is Recipe else ([], [])
            )
    if problems:
        raise ConfigError(problems, source=source)
    return recipe


def recipe_key_problem(dotted: str, drafter: str | None = None) -> str | None:
    """Why a dotted override key (`training.lrr`, `eagle.ttt_step`) names nothing in a recipe, or None.

    Keys under a drafter's section are checked against that drafter's schema (`drafter`: the recipe's
    drafter, default the default one; every built-in drafter's section is known).
    """
    try:
        chosen = resolve_drafter(drafter)
    except UnknownDrafter:
        chosen = resolve_drafter(None)
    sections = {d.section: d for d in builtin_drafters()}
    sections[chosen.section] = chosen
    head, _, rest = dotted.partition(".")
    if head in sections:
        return key_problem(sections[head].Settings, rest, prefix=[head]) if rest else None
    return key_problem(Recipe, dotted, extra_keys=[chosen.section])


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe YAML, apply dotted overrides, validate."""
    data = load_yaml_file(str(path))
    data = apply_overrides(data, overrides)
    return parse_recipe(data, source=str(path))
