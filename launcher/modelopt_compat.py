"""Model-Optimizer's launcher names and ours: the hints validation prints, and `launch.py --migrate SPEC`.

The one owner of "what Model-Optimizer calls it and what we call it" (docs/migrating.md is its table).
Model-Optimizer's job-spec format is ours; what differs is its recipe (`modelopt_recipes/.../eagle3.yaml`,
HF TrainingArguments names), a few environment knobs of its entry scripts, its scripts' names, and two
`slurm_config` fields. Pure data and dict rewriting: no nemo_run, no ML import.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.schema import task_number

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC = "docs/migrating.md"

#: Model-Optimizer recipe key -> (our key or None, why / what to do instead).
RECIPE_KEYS: dict[str, tuple[str | None, str]] = {
    "model.model_name_or_path": ("model.path", ""),
    "model.use_fake_base_for_offline": (None, "the trainer loads only the target tensors it needs"),
    "data.data_path": ("data.path", ""),
    "data.offline_data_path": ("data.offline_dir", ""),
    "data.mode": (None, "derived from the source; the streaming entry script sets data.server_urls"),
    "data.streaming_server_url": (None, "the streaming entry script sets data.server_urls"),
    "data.streaming_model_name": (None, "the target is model.path"),
    "data.draft_vocab_cache": (None, "the draft vocabulary is built from data.path (eagle.draft_vocab_size)"),
    "data.vlm_img_dir": (None, "text-only targets for now"),
    "data.vlm_processor": (None, "text-only targets for now"),
    "training.num_train_epochs": ("training.epochs", ""),
    "training.per_device_train_batch_size": ("training.batch_size", ""),
    "training.gradient_accumulation_steps": ("training.grad_accum", ""),
    "training.learning_rate": ("training.lr", ""),
    "training.lr_scheduler_type": ("training.schedule", ""),
    "training.training_seq_len": ("data.max_length", ""),
    "training.logging_steps": ("training.log_interval", ""),
    "training.save_steps": ("training.save_interval", ""),
    "training.dataloader_num_workers": ("data.num_workers", ""),
    "training.bf16": ("training.dtype", "true -> bfloat16 (auto: bf16 autocast on GPU)"),
    "training.disable_tqdm": (None, "progress is printed as plain lines with rate and ETA"),
    "training.ar_validate_steps": (None, "acceptance is measured by the benchmark task"),
    "training.estimate_ar": (None, "acceptance is measured by the benchmark task"),
    "training.cp_size": (None, "no context parallelism"),
    "training.answer_only_loss": (None, "the loss covers assistant tokens"),
    "training.do_eval": (None, "no in-training evaluation"),
    "training.save_strategy": (None, "checkpoints every training.save_interval steps"),
    "training.dataloader_drop_last": (None, "not configurable"),
    "training.tf32": (None, "not configurable"),
    "training.remove_unused_columns": (None, "not configurable"),
    "eagle.eagle_ttt_steps": ("eagle.ttt_steps", ""),
    "eagle.eagle_loss_decay_factor": ("eagle.step_loss_decay", ""),
    "eagle.eagle_freeze_base_model": (None, "the target is always frozen"),
    "eagle.eagle_use_torch_compile": (None, "not configurable"),
    "eagle.eagle_decoder_type": (None, "the EAGLE-3 head is a Llama decoder layer"),
    "eagle.eagle_self_logit_distillation": (None, "the head always learns the target's distribution"),
    "eagle.eagle_architecture_config": (None, "the EAGLE-3 head is one decoder layer (not configurable)"),
    "eagle.eagle_export_rope_scaling": (None, "the export copies the target's rope settings"),
    "metadata": (None, "not part of our recipes"),
}
#: Same meaning, same name: kept as they are.
SAME_RECIPE_KEYS = (
    "model.trust_remote_code",
    "training.output_dir",
    "training.max_steps",
    "training.warmup_steps",
    "training.weight_decay",
    "training.max_grad_norm",
    "training.seed",
)

#: Environment knobs of Model-Optimizer's entry scripts that ours do not read -> what to do instead.
ENV_KNOBS: dict[str, str] = {
    "HF_MODEL_CKPT": "not read here: the target is the recipe's model.path (args: model.path=...)",
    "SERVE_READY_TIMEOUT": "use SERVE_START_TIMEOUT_S",
    "TRAIN_GPUS": "use TRAIN_PROCS_PER_NODE (the trainer takes the GPUs the server does not)",
    "SERVE_GPU": "not read here: on one node the server takes SERVE_TP GPUs, the trainer the rest",
    "SERVE_HOST": "not read here: servers bind 0.0.0.0 and publish SERVE_ADVERTISE_IP",
    "SERVE_EXTRA_ARGS": "not read here: the entry script passes SERVE_TP, SERVE_GPU_MEM_UTIL, "
    "SERVE_MAX_MODEL_LEN and SERVE_MAX_NUM_SEQS to vLLM",
    "SERVE_CPU_OFFLOAD_GB": "not read here (no CPU offload knob)",
    "SERVE_BLOCK_SIZE": "not read here (no block-size knob)",
    "EXPORT_PATH": "not read here: the export goes to <training.output_dir>/export",
    "EXPORT_EXTRA_ARGS": "not read here: the export needs no extra arguments",
    "HS_SIDECAR_PORT": "not read here: hidden states go through files on shared storage",
    "HS_POOL_SLOTS": "not read here: hidden states go through files on shared storage",
    "HS_MAX_TOKENS": "not read here: hidden states go through files on shared storage",
}
#: Renamed knobs (for --migrate): theirs -> ours.
ENV_RENAMES = {"SERVE_READY_TIMEOUT": "SERVE_START_TIMEOUT_S"}

#: Model-Optimizer entry scripts -> our equivalent (or None) and what to do.
SCRIPTS: dict[str, tuple[str | None, str]] = {
    "common/eagle3/make_dataset.sh": (
        None,
        (
            "stage a conversations JSONL into $MODELOPT_SCRATCH (an inline copy task, as in our examples; "
            "docs/data.md)"
        ),
    ),
    "common/specdec_bench/quick_check.sh": ("common/eagle3/benchmark.sh", "OUTPUT TARGET PROMPTS.jsonl"),
    "common/specdec_bench/run.sh": ("common/eagle3/benchmark.sh", "OUTPUT TARGET PROMPTS.jsonl"),
    "common/eagle3/dump_offline_data_hf.sh": (None, "train from streamed hidden states instead"),
    "common/eagle3/dump_offline_data_vllm.sh": (None, "train from streamed hidden states instead"),
}

#: Model-Optimizer `slurm_config` fields we do not have.
SLURM_KEYS: dict[str, str] = {
    "modelopt_install_path": "Model-Optimizer's field; not needed (our package runs from the repo, MODELOPT_REPO)",
    "local": "Model-Optimizer's field; use the task's `executor: local` instead",
}

_MO_RECIPE = re.compile(r"(^|/)(modules/Model-Optimizer/|modelopt_recipes/)")


def is_modelopt_recipe(path: str) -> bool:
    """A recipe path that points into a Model-Optimizer checkout."""
    return bool(_MO_RECIPE.search(path))


def recipe_for(model: str | None) -> str:
    """Our recipe for a target (by its folder/hub name, e.g. .../Qwen3-8B), else the generic one."""
    if model:
        name = model.rstrip("/").rsplit("/", 1)[-1]
        candidate = f"recipes/eagle3/{name}.yaml"
        if (REPO_ROOT / candidate).is_file():
            return candidate
    return "recipes/eagle3/default.yaml"


def recipe_key_hint(key: str) -> str | None:
    """'use model.path' style hint for a Model-Optimizer recipe key (or one of its sections), else None."""
    entry = RECIPE_KEYS.get(key) or RECIPE_KEYS.get(key.split(".", 1)[0])
    if entry is None:
        return None
    ours, why = entry
    if ours:
        return f"Model-Optimizer's name; use {ours}" + (f" ({why})" if why else "")
    return f"Model-Optimizer's key; no equivalent here ({why}): remove it; see {DOC}"


def env_hint(name: str) -> str | None:
    """Hint for a Model-Optimizer-only environment knob, else None."""
    why = ENV_KNOBS.get(name)
    return f"Model-Optimizer's knob; {why}; see {DOC}" if why else None


def script_hint(script: str) -> str | None:
    """Hint for a Model-Optimizer entry script that this project does not have, else None."""
    entry = SCRIPTS.get(script)
    if entry is None:
        return None
    ours, what = entry
    if ours:
        return f"{script}: Model-Optimizer's script; use {ours} {what}; see {DOC}"
    return f"{script}: not part of this project; {what}; see {DOC}"


def slurm_key_hint(key: str) -> str | None:
    """Hint for a Model-Optimizer-only slurm_config field, else None."""
    why = SLURM_KEYS.get(key)
    return f"unknown key: {why}" if why else None


# ---------------------------------------------------------------------------------------------- migrate


@dataclass
class Migration:
    """The rewritten spec mapping and one note per change or dropped item."""

    spec: dict
    notes: list[str]


_SCRATCH = re.compile(r"(?<![\w$])/scratchspace(?=/|$)")


def _scratch(text: str) -> str:
    """/scratchspace/x -> ${MODELOPT_SCRATCH}/x: the same folder with or without a container."""
    return _SCRATCH.sub("${MODELOPT_SCRATCH}", text)


def _env_items(env: Any) -> list[tuple[str, Any]]:
    if isinstance(env, dict):
        return list(env.items())
    if isinstance(env, list):
        return [kv for item in env if isinstance(item, dict) for kv in item.items()]
    return []


def _words(args: Any) -> list[str]:
    if not isinstance(args, list):
        return []
    out: list[str] = []
    for a in args:
        try:
            out.extend(shlex.split(str(a)))
        except ValueError:
            out.append(str(a))
    return out


def _migrate_override(word: str, where: str, notes: list[str]) -> str | None:
    key, sep, value = word.partition("=")
    if not sep:
        return word
    value = _scratch(value)
    if key in RECIPE_KEYS or key.split(".", 1)[0] in RECIPE_KEYS:
        ours, why = RECIPE_KEYS.get(key) or RECIPE_KEYS[key.split(".", 1)[0]]
        if ours is None:
            notes.append(f"{where}: dropped {word} (no equivalent: {why})")
            return None
        if key == "training.bf16":
            value = "bfloat16" if value.strip().lower() in ("true", "1") else "float32"
        notes.append(f"{where}: {key} -> {ours}")
        return f"{ours}={value}"
    return f"{key}={value}"


def _migrate_trainer_args(args: list[str], model_hint: str | None, where: str, notes: list[str]) -> list[str]:
    words = _words(args)
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w.startswith("--config="):  # the one-word form: same as `--config PATH`
            words[i : i + 1] = ["--config", w.partition("=")[2]]
            continue
        if w == "--config" and i + 1 < len(words):
            path = words[i + 1]
            if is_modelopt_recipe(path):
                ours = recipe_for(model_hint)
                notes.append(f"{where}: --config {path} -> --config {ours}")
                path = ours
            out.append(f"--config {path}")
            i += 2
            continue
        migrated = _migrate_override(w, where, notes)
        if migrated is not None:
            out.append(shlex.quote(migrated) if any(c.isspace() for c in migrated) else migrated)
        i += 1
    return out


def _model_of(words: list[str], gvars: dict) -> str | None:
    for w in words:
        key, _, value = w.partition("=")
        if key in ("model.model_name_or_path", "model.path"):
            m = re.fullmatch(r"<<\s*global_vars\.(\w+)\s*>>", value)
            return str(gvars.get(m.group(1))) if m else value
    return None


def _benchmark_args(
    task: dict,
    train_output: str | None,
    target: str | None,
    prompts: str | None,
    where: str,
    notes: list[str],
) -> tuple[list[str], list[dict]]:
    words = _words(task.get("args"))
    opts: dict[str, str] = {}
    i = 0
    while i < len(words):
        if words[i].startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("--"):
            opts[words[i][2:]] = words[i + 1]
            i += 2
        else:
            i += 1
    env: list[dict] = []
    if "draft_length" in opts:
        env.append({"BENCH_STEPS": opts.pop("draft_length")})
    if "output_length" in opts:
        env.append({"BENCH_NEW_TOKENS": opts.pop("output_length")})
    opts.pop("draft_model_dir", None)
    mtbench = opts.pop("mtbench", None)
    if opts:
        notes.append(
            f"{where}: dropped {', '.join('--' + k for k in opts)} (benchmark.sh measures acceptance "
            "with our own proposer on this task's node)"
        )
    if mtbench:
        notes.append(
            f"{where}: --mtbench {mtbench} -> the training conversations as prompts "
            "(benchmark.sh reads conversations JSONL)"
        )
    args = [
        train_output or "${MODELOPT_SCRATCH}/eagle3",
        target or "<<global_vars.hf_model>>",
        prompts or "${MODELOPT_SCRATCH}/data/train.jsonl",
    ]
    return args, env


_STAGE = """set -euo pipefail
mkdir -p "$MODELOPT_SCRATCH/data"
test -s "<<global_vars.train_data>>" || { echo "training data not found: <<global_vars.train_data>>" >&2; exit 2; }
cp "<<global_vars.train_data>>" "$MODELOPT_SCRATCH/data/train.jsonl"
"""


def migrate(data: dict) -> Migration:
    """Rewrite a Model-Optimizer job spec mapping into ours; what has no equivalent is dropped with a note."""
    spec = copy.deepcopy(data)
    notes: list[str] = []
    pipeline = spec.get("pipeline")
    if not isinstance(pipeline, dict):
        return Migration(spec, ["pipeline: missing; nothing to migrate"])
    gvars = pipeline.get("global_vars") if isinstance(pipeline.get("global_vars"), dict) else {}
    if pipeline.get("note") is None and "note" in pipeline:
        pipeline["note"] = ""
    names = [k for k in pipeline if task_number(k) is not None]
    train_output = target = prompts = None
    for name in sorted(names, key=task_number):
        task = pipeline[name]
        where = f"pipeline.{name}"
        if not isinstance(task, dict):
            continue
        cfg = task.get("slurm_config")
        if isinstance(cfg, dict):
            for key in list(cfg):
                if key in SLURM_KEYS:
                    if key == "local" and cfg[key]:
                        task["executor"] = "local"
                    notes.append(f"{where}.slurm_config: dropped {key} ({SLURM_KEYS[key]})")
                    del cfg[key]
        env = _env_items(task.get("environment"))
        new_env: list[dict] = []
        for k, v in env:
            if k in ENV_RENAMES:
                notes.append(f"{where}.environment: {k} -> {ENV_RENAMES[k]}")
                new_env.append({ENV_RENAMES[k]: v})
            elif k in ENV_KNOBS:
                notes.append(f"{where}.environment: dropped {k} ({ENV_KNOBS[k]})")
                if k == "HF_MODEL_CKPT" and target is None:
                    target = v
            else:
                new_env.append({k: _scratch(v) if isinstance(v, str) else v})
        script = task.get("script")
        if script == "common/eagle3/make_dataset.sh":
            notes.append(
                f"{where}: common/eagle3/make_dataset.sh -> an inline task copying global_vars.train_data "
                "(set it to your conversations JSONL; docs/data.md) to $MODELOPT_SCRATCH/data/train.jsonl"
            )
            gvars.setdefault("train_data", "/hf-local/datasets/train.jsonl")
            pipeline["global_vars"] = gvars
            task.pop("script")
            task.pop("args", None)
            task["inline"] = _STAGE
            prompts = "${MODELOPT_SCRATCH}/data/train.jsonl"
        elif script == "common/eagle3/train_eagle_streaming.sh":
            words = _words(task.get("args"))
            task["args"] = _migrate_trainer_args(
                task.get("args") or [], _model_of(words, gvars), where, notes
            )
            for w in task["args"]:
                key, _, value = w.partition("=")
                if key == "training.output_dir":
                    train_output = value
                if key == "model.path":
                    target = value
        elif script in ("common/specdec_bench/quick_check.sh", "common/specdec_bench/run.sh"):
            args, bench_env = _benchmark_args(task, train_output, target, prompts, where, notes)
            notes.append(f"{where}: {script} -> common/eagle3/benchmark.sh {' '.join(args)}")
            task["script"] = "common/eagle3/benchmark.sh"
            task["args"] = args
            new_env.extend(bench_env)
        elif isinstance(script, str) and script in SCRIPTS:
            notes.append(f"{where}: {script_hint(script)}: task left as is")
        if "environment" in task or new_env:
            if new_env:
                task["environment"] = new_env
            else:
                task.pop("environment", None)
        order = ("script", "inline", "args", "environment", "slurm_config")
        pipeline[name] = {k: task[k] for k in order if k in task} | {
            k: v for k, v in task.items() if k not in order
        }
    if "hf_local" not in spec and "/hf-local" in yaml.safe_dump(spec):
        # Model-Optimizer's slurm_factory mounts $SLURM_HF_LOCAL (default /hf-local) at /hf-local; ours mounts
        # the top-level hf_local there.
        spec["hf_local"] = os.environ.get("SLURM_HF_LOCAL") or "/hf-local"
        notes.append(
            f"hf_local: {spec['hf_local']} (Model-Optimizer's slurm_factory mounted $SLURM_HF_LOCAL at /hf-local; "
            "set it to the host folder of your models and data)"
        )
    return Migration(spec, notes)


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line text (inline scripts), as people write it."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def render(migration: Migration, source: str) -> str:
    """The migrated spec as YAML, headed by one comment line per change."""
    head = [f"# Migrated from Model-Optimizer's {source} by `launch.py --migrate` ({DOC}).", "#"]
    head += [f"#   {n}" for n in migration.notes] or ["#   (nothing to change)"]
    body = yaml.dump(migration.spec, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)
    return "\n".join(head) + "\n" + body


def migrated_path(source: str | Path) -> Path:
    """Where `--migrate --write` puts the result: next to the original, `<stem>.migrated.yaml`."""
    p = Path(source)
    return p.with_name(f"{p.stem}.migrated.yaml")
