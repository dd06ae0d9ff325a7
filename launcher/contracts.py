"""The project's entry scripts and what each accepts: arguments, environment knobs, inputs and outputs.

The one place an entry script's contract is declared (the scripts' headers and docs/entry-scripts.md point
here). At validation, dry-run and submit the launcher checks every task that runs one of these scripts, so a
mistake surfaces here, not on the nodes after the queue wait: the trainer's arguments (the recipe exists and
validates with the task's overrides, and with the overrides the script adds), typed knobs, capture ids
against the target when its config is readable here, and local inputs (unless an earlier task of the
pipeline produces them: paths under the run's scratch folder, or an earlier script's declared outputs).
Scripts not listed here (user scripts) and `inline` tasks are not second-guessed.

No ML import: recipes are validated with the pydantic schema (modelopt_ext.config), target configs read as
JSON (modelopt_ext.targets.layers).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from launcher import modelopt_compat as mo
from modelopt_ext.targets import locate as targets
from modelopt_ext.util.errors import ConfigError, did_you_mean_word

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTAINER_SCRATCH = "/scratchspace"
CONTAINER_HF_LOCAL = "/hf-local"

# ------------------------------------------------------------------------------------------ knob types


def _int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        t = text.strip()
        if not re.fullmatch(r"\d+", t) or int(t) < lo or (hi is not None and int(t) > hi):
            bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"must be a whole number {bound}")
        return int(t)

    return parse


def _number(ok: Callable[[float], bool], bound: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not ok(v):  # NaN fails every bound
            raise ValueError(f"must be a number {bound}")
        return v

    return parse


_fraction = _number(lambda v: 0 < v <= 1, "in (0, 1]")
_positive_or_zero = _number(lambda v: v >= 0, ">= 0")
_positive = _number(lambda v: v > 0, "> 0")


def _choice(*values: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in values:
            raise ValueError(f"allowed: {', '.join(values)}")
        return text

    return parse


def _text(text: str) -> str:
    """text"""
    return text


def parse_ids(text: str) -> list[int]:
    """'[2,18,33,36]' or '2,18,33,36' -> ids (EAGLE_CAPTURE_IDS); ValueError otherwise."""
    from modelopt_ext.targets.layers import check_capture_list, parse_capture_ids

    return check_capture_list(parse_capture_ids(text))


SECONDS = _int(1)
PORT = _int(1, 65535)


@dataclass(frozen=True)
class Knob:
    """An environment variable an entry script reads, and how its value must parse."""

    name: str
    parse: Callable[[str], object]
    meaning: str


# ------------------------------------------------------------------------------------------ task view


@dataclass
class TaskView:
    """What a contract check sees of one task (after global-var interpolation)."""

    path: str  # 'pipeline.task_1'
    args: list[str]
    env: dict[str, str]
    nodes: int
    gpus_per_node: int | None
    container: bool
    mounts: list[tuple[str, str]]  # (container path, host path)
    repo_dir: str  # the repo as nodes see it
    files_visible: bool  # the task runs where this machine's files are (local or a Slurm host here)
    has_earlier: bool
    produced: list[Path]  # host paths earlier tasks write
    problems: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)

    def problem(self, where: str, text: str) -> None:
        """Add one problem line under this task's field path."""
        self.problems.append(f"{self.path}{where}: {text}")

    def words(self) -> list[tuple[int, str]]:
        """[(args index, shell word)] (an args item is shell text: '--config FILE' is two words)."""
        out: list[tuple[int, str]] = []
        for i, item in enumerate(self.args):
            try:
                out.extend((i, w) for w in shlex.split(item))
            except ValueError as e:
                self.problem(f".args[{i}]", f"not valid shell text ({e})")
        return out

    # -------------------------------------------------------------------------------- paths

    def expand(self, text: str) -> str | None:
        """Expand $VAR/${VAR} the task defines; None when a variable is only known on the node."""
        known = {"MODELOPT_SCRATCH": "\0scratch", "MODELOPT_REPO": self.repo_dir, **self.env}
        unknown = False

        def sub(m: re.Match) -> str:
            nonlocal unknown
            name = m.group(1) or m.group(2)
            if name in known:
                return known[name]
            unknown = True
            return m.group(0)

        out = re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)
        return None if unknown else out

    def locate(self, text: str) -> Path | str:
        """A path word -> its host path, or 'scratch' (the run's scratch folder), or 'unknown'."""
        expanded = self.expand(text)
        if expanded is None:
            return "unknown"
        if expanded.startswith("\0scratch"):
            return "scratch"
        if expanded.startswith("~"):
            return "unknown"  # the node's home
        if self.container and (expanded == CONTAINER_SCRATCH or expanded.startswith(CONTAINER_SCRATCH + "/")):
            return "scratch"
        p = PurePosixPath(expanded)
        if not p.is_absolute():
            return REPO_ROOT / p  # node_exec.sh runs every script from the repo root
        repo = PurePosixPath(self.repo_dir)
        if p == repo or repo in p.parents:
            return REPO_ROOT / p.relative_to(repo)
        if self.container:
            for inside, host in self.mounts:
                q = PurePosixPath(inside)
                if p == q or q in p.parents:
                    return Path(host) / p.relative_to(q)
            return "unknown"  # inside the image, not visible from here
        return Path(expanded)

    def need_input(self, where: str, text: str, what: str, *, kind: str = "any") -> Path | None:
        """Check that an input exists (or an earlier task makes it); returns its host path when checked."""
        loc = self.locate(text)
        if loc == "unknown":
            return None
        if loc == "scratch":
            if not self.has_earlier:
                self.problem(
                    where,
                    f"{what} {text} is in the run's scratch folder, which starts empty: no earlier task of "
                    "this pipeline writes it",
                )
            return None
        assert isinstance(loc, Path)
        if any(loc == p or p in loc.parents for p in self.produced):
            return None
        if not self.files_visible:
            return None  # a remote cluster's files (its copy of the repo included) are not visible from here
        ok = loc.is_file() if kind == "file" else loc.is_dir() if kind == "dir" else loc.exists()
        if not ok:
            self.problem(where, f"{what} not found: {text}" + (f" ({loc})" if str(loc) != text else ""))
            return None
        return loc

    def output(self, text: str) -> None:
        """Record a path this task writes (later tasks may read it)."""
        loc = self.locate(text)
        if isinstance(loc, Path):
            self.outputs.append(loc)


def looks_like_hub_id(text: str) -> bool:
    """A model hub id (modelopt_ext.targets.locate decides what one looks like) that is not also a repo path here."""
    return targets.looks_like_hub_id(text) and not (REPO_ROOT / text).exists()


# ------------------------------------------------------------------------------------------ scripts


@dataclass(frozen=True)
class EntryScript:
    """One of our entry scripts: usage, knobs and a check of a task that runs it."""

    path: str
    usage: str
    knobs: tuple[Knob, ...]
    check: Callable[[TaskView, EntryScript], None]


def _check_knobs(view: TaskView, script: EntryScript) -> dict[str, object]:
    values: dict[str, object] = {}
    names = {k.name for k in script.knobs}
    for knob in script.knobs:
        if knob.name in view.env:
            try:
                values[knob.name] = knob.parse(view.env[knob.name])
            except ValueError as e:
                view.problem(f".environment.{knob.name}", f"{e} (got {view.env[knob.name]!r})")
    for name in view.env:
        if name in names:
            continue
        hint = mo.env_hint(name)
        if hint:
            view.problem(f".environment.{name}", hint)
            continue
        close = did_you_mean_word(name, names)
        if close and _similar(name, close):
            view.problem(f".environment.{name}", f"not a knob of {script.path} (did you mean '{close}'?)")
    return values


def _similar(a: str, b: str) -> bool:
    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.85


# ---------------------------------------------------------------------------- the trainer's arguments


def _trainer_args(view: TaskView) -> tuple[str | None, int | None, list[tuple[int, str]], str | None] | None:
    """(recipe, its args index, [(index, override)], resume) from the task's words, or None after a problem."""
    from modelopt_ext.train import build_parser

    words = view.words()
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_intermixed_args([w for _, w in words])
    except SystemExit:
        msg = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "invalid arguments"
        view.problem(
            ".args", f"{msg.split('error: ', 1)[-1]}; usage: --config RECIPE [overrides] [--resume auto]"
        )
        return None
    index = {w: i for i, w in reversed(words)}
    cfg_index = next((i for i, w in words if w == "--config" or w.startswith("--config=")), None)
    overrides = [(index.get(o, 0), o) for o in ns.overrides]
    return ns.config, cfg_index, overrides, ns.resume


def _recipe_problems(recipe_file: Path, overrides: list[str]) -> list[str]:
    from modelopt_ext.config.recipe import load_recipe

    try:
        load_recipe(recipe_file, overrides)
    except ConfigError as e:
        return e.problems
    return []


def _check_trainer(view: TaskView, knobs: dict[str, object]) -> None:
    parsed = _trainer_args(view)
    if parsed is None:
        return
    config, cfg_index, overrides, resume = parsed
    from modelopt_ext.config.recipe import load_recipe, recipe_key_problem

    where_cfg = f".args[{cfg_index}]" if cfg_index is not None else ".args"
    recipe_file: Path | None = None
    if mo.is_modelopt_recipe(config):
        model = next(
            (
                o.partition("=")[2]
                for _, o in overrides
                if o.startswith(("model.path=", "model.model_name_or_path="))
            ),
            None,
        )
        view.problem(
            where_cfg,
            f"--config {config}: Model-Optimizer's recipe; use ours: --config {mo.recipe_for(model)} "
            f"(recipes/eagle3/ has one per target); see {mo.DOC}",
        )
    else:
        loc = view.locate(config)
        if isinstance(loc, Path) and loc.is_file():
            recipe_file = loc
        elif isinstance(loc, Path):
            known = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "recipes").rglob("*.yaml"))
            close = did_you_mean_word(config, known)
            view.problem(
                where_cfg,
                f"--config {config}: recipe not found (relative to the repo root)"
                + (f" (did you mean '{close}'?)" if close else f"; recipes here: {', '.join(known)}"),
            )
    # Each override: Model-Optimizer names get their replacement, unknown keys a did-you-mean.
    usable: list[str] = []
    for i, text in overrides:
        key, sep, value = text.partition("=")
        if not sep:
            view.problem(f".args[{i}]", f"{text!r}: expected a dotted override KEY.PATH=VALUE")
            continue
        if key == "data.mode":
            view.problem(
                f".args[{i}]",
                "data.mode: set by the streaming entry script (its data.server_urls make the mode streaming; "
                "SERVE_ENGINE=target makes it remote): remove it",
            )
            continue
        hint = mo.recipe_key_hint(key) if recipe_key_problem(key) else None
        if hint:
            view.problem(f".args[{i}]", f"{key}: {hint}")
            continue
        bad = recipe_key_problem(key)
        if bad:
            view.problem(f".args[{i}]", f"{key}: {bad}")
            continue
        expanded = view.expand(value)
        if expanded is None:
            continue  # its value is only known on the node; the key is fine
        usable.append(f"{key}={expanded.replace(chr(0) + 'scratch', '${MODELOPT_SCRATCH}')}")
    if recipe_file is None:
        return
    # The recipe as job_info sees it (the task's args), then as the trainer sees it (plus the script's own).
    runtime = [
        "data.server_urls=[http://serve-node:8765]",
        f"data.shared_storage_root={CONTAINER_SCRATCH}/hidden_states",
    ]
    ids = knobs.get("EAGLE_CAPTURE_IDS")
    if isinstance(ids, list):
        from modelopt_ext.targets.layers import drafter_ids_of_capture

        runtime.append(f"model.aux_layer_ids=[{','.join(map(str, drafter_ids_of_capture(ids)))}]")
    if knobs.get("SERVE_ENGINE") == "target":
        runtime.append("data.mode=remote")
    if "STREAMING_NUM_WORKERS" in knobs:
        runtime.append(f"data.num_workers={knobs['STREAMING_NUM_WORKERS']}")
    shown = _shown(recipe_file)
    seen: set[str] = set()
    for extra in ([], runtime):
        for p in _recipe_problems(recipe_file, usable + extra):
            if p not in seen:
                seen.add(p)
                added = " (with the streaming script's own overrides)" if extra else ""
                view.problem(".args", f"recipe {shown}{added}: {p}")
    if seen:
        return
    recipe = load_recipe(recipe_file, usable + runtime)
    given = {o.partition("=")[0]: i for i, o in overrides}
    _check_trainer_inputs(view, recipe, ids if isinstance(ids, list) else None, resume, given)
    view.output(recipe.training.output_dir)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _check_trainer_inputs(
    view: TaskView, recipe, capture_ids: list[int] | None, resume: str | None, given: dict[str, int]
) -> None:
    """Inputs of the recipe (as overridden) exist; capture ids fit the target when its config is here.

    `given` maps override keys to their args index, so a line points at the override that set the value.
    """
    from modelopt_ext.drafters import resolve_drafter
    from modelopt_ext.drafters.layers import drafter_layer_ids
    from modelopt_ext.targets.layers import capture_layer_ids, check_capture_ids, target_num_layers

    def at(key: str) -> str:
        return f".args[{given[key]}]" if key in given else ".args"

    target = recipe.model.path
    num_layers = None
    if not looks_like_hub_id(target):
        folder = view.need_input(at("model.path"), target, "model.path: target folder", kind="dir")
        if folder is not None:
            try:
                num_layers = target_num_layers(folder)
            except (ValueError, OSError) as e:
                view.problem(at("model.path"), f"model.path: {target}: {str(e).splitlines()[0]}")
    view.need_input(at("data.path"), recipe.data.path, "data.path: conversations file", kind="file")
    if recipe.data.chat_template and recipe.data.chat_template.endswith(".jinja"):
        view.need_input(
            at("data.chat_template"), recipe.data.chat_template, "data.chat_template", kind="file"
        )
    if recipe.data.auth_token_file:
        view.need_input(
            at("data.auth_token_file"), recipe.data.auth_token_file, "data.auth_token_file", kind="file"
        )
    if resume and resume != "auto":
        view.need_input(".args", resume, "--resume checkpoint", kind="dir")
    if num_layers is None:
        return
    if capture_ids is not None:
        try:
            check_capture_ids(num_layers, capture_ids)
        except ValueError as e:
            rule = drafter_layer_ids(num_layers, None, resolve_drafter(recipe.drafter), recipe.drafter_settings)
            view.problem(
                ".environment.EAGLE_CAPTURE_IDS",
                f"{e} ({target} has {num_layers} decoder layers; e.g. {capture_layer_ids(num_layers, rule)})",
            )
    elif recipe.model.aux_layer_ids is not None:
        try:
            capture_layer_ids(num_layers, recipe.model.aux_layer_ids)
        except ValueError as e:
            view.problem(at("model.aux_layer_ids"), f"model.aux_layer_ids: {e}")


def _check_serve_tp(view: TaskView, knobs: dict[str, object]) -> None:
    tp = knobs.get("SERVE_TP")
    gpus = view.gpus_per_node
    if not isinstance(tp, int) or not gpus:
        return
    if tp > gpus:
        view.problem(".environment.SERVE_TP", f"{tp} is more than gpus_per_node={gpus}")
    elif view.nodes == 1 and tp >= gpus and "TRAIN_PROCS_PER_NODE" not in view.env:
        view.problem(
            ".environment.SERVE_TP",
            f"{tp} leaves no GPU for the trainer on the single node (gpus_per_node={gpus}); allowed: 1..{gpus - 1}",
        )


def _check_streaming(view: TaskView, script: EntryScript) -> None:
    knobs = _check_knobs(view, script)
    _check_trainer(view, knobs)
    _check_serve_tp(view, knobs)


# ---------------------------------------------------------------------------- positional scripts


def _positional(view: TaskView, lo: int, hi: int, usage: str) -> list[tuple[int, str]] | None:
    words = view.words()
    if not lo <= len(words) <= hi:
        n = f"{lo}" if lo == hi else f"{lo} to {hi}"
        view.problem(".args", f"expected {n} arguments ({usage}), got {len(words)}")
        return None
    return words


def _check_prepare_tiny(view: TaskView, script: EntryScript) -> None:
    _check_knobs(view, script)
    words = _positional(view, 0, 1, script.usage)
    if words is not None:
        view.output(words[0][1] if words else "outputs/tiny")


def _check_benchmark(view: TaskView, script: EntryScript) -> None:
    _check_knobs(view, script)
    words = _positional(view, 3, 3, script.usage)
    if words is None:
        return
    (i_out, out), (i_target, target), (i_prompts, prompts) = words
    view.need_input(f".args[{i_out}]", f"{out}/export", "TRAIN_OUTPUT_DIR/export (the exported drafter)")
    if not looks_like_hub_id(target):
        view.need_input(f".args[{i_target}]", target, "TARGET folder", kind="dir")
    view.need_input(f".args[{i_prompts}]", prompts, "PROMPTS file", kind="file")


# Read by common/lib/python.sh, which every entry script sources (docs/install.md).
NODE_PYTHON_KNOBS = (
    Knob("MODELOPT_PYTHON", _text, "the project's interpreter on the nodes"),
    Knob("NODE_WHEELHOUSE", _text, "offline nodes: install what the image lacks from this folder"),
    Knob("NODE_ENV_ROOT", _text, "where the per-job top-up environments live"),
    Knob("NODE_PROVISION_TIMEOUT_S", SECONDS, "building the top-up environment"),
)

STREAMING_KNOBS = (
    Knob("SERVE_NODES", _int(0), "nodes that serve hidden states (the launcher's role plan)"),
    Knob("SERVE_ENGINE", _choice("vllm", "target"), "hidden-state server"),
    Knob("SERVE_PORT", PORT, "server port"),
    Knob("SERVE_TP", _int(1), "vLLM tensor-parallel size"),
    Knob("SERVE_GPU_MEM_UTIL", _fraction, "vLLM --gpu-memory-utilization"),
    Knob("SERVE_MAX_MODEL_LEN", _int(1), "vLLM --max-model-len"),
    Knob("SERVE_MAX_NUM_SEQS", _int(1), "vLLM --max-num-seqs"),
    Knob("SERVE_ADVERTISE_IP", _text, "address published for this node"),
    Knob("SERVE_SHARED_STORAGE", _text, "hidden-state folder (default: the run's scratch)"),
    Knob("EAGLE_CAPTURE_IDS", parse_ids, "layer ids the servers capture (aux ids, then L)"),
    Knob("STREAMING_NUM_WORKERS", _int(0), "DataLoader workers per rank (fetch concurrency)"),
    Knob("MAIN_PROCESS_PORT", PORT, "accelerate's rendezvous port"),
    Knob("TRAIN_PROCS_PER_NODE", _int(1), "training processes per trainer node"),
    *NODE_PYTHON_KNOBS,
    Knob("SERVE_START_TIMEOUT_S", SECONDS, "server start to healthy"),
    Knob("SERVE_WAIT_S", SECONDS, "trainers waiting for the servers' addresses"),
    Knob("HEALTH_WAIT_S", SECONDS, "each server's health check"),
    Knob("TRAINER_WAIT_S", SECONDS, "non-head trainers waiting for the head's address"),
    Knob("DONE_WAIT_S", SECONDS, "non-head trainers waiting for the done marker"),
    Knob("SERVER_STOP_GRACE_S", SECONDS, "SIGTERM -> SIGKILL grace of a server"),
    Knob("TRAIN_ENTRY", _choice("modelopt_ext.train", "modelopt_ext.dump"), "what the trainer ranks run"),
    Knob("SERVE_RESTARTS", _int(0), "restarts of a dead server by its node (with >= 2 serve nodes)"),
    Knob("SERVE_RESTART_BACKOFF_S", _positive, "first wait before a restart (doubles each time)"),
    Knob("RDV_POLL_S", _positive, "marker polling period"),
)

SCRIPTS: dict[str, EntryScript] = {
    s.path: s
    for s in (
        EntryScript(
            "common/eagle3/train_eagle_streaming.sh",
            "--config RECIPE [overrides] [--resume auto|CHECKPOINT], as python -m modelopt_ext.train",
            STREAMING_KNOBS,
            _check_streaming,
        ),
        EntryScript(
            "common/eagle3/prepare_tiny.sh",
            "[TINY_DIR], default outputs/tiny",
            (Knob("PREPARE_VLLM_ENV", _choice("0", "1"), "also build vLLM's environment"), *NODE_PYTHON_KNOBS),
            _check_prepare_tiny,
        ),
        EntryScript(
            "common/eagle3/benchmark.sh",
            "TRAIN_OUTPUT_DIR TARGET PROMPTS.jsonl",
            (
                Knob("BENCH_PROMPTS", _int(1), "prompts measured"),
                Knob("BENCH_STEPS", _int(1), "draft tokens per round"),
                Knob("BENCH_NEW_TOKENS", _int(1), "new tokens per prompt"),
                Knob("BENCH_ENGINES", _text, "serving engines measured (vllm, sglang; none)"),
                Knob("BENCH_GATE_THRESHOLD", _fraction, "largest engine shortfall below specdec_bench"),
                Knob("BENCH_TEMPERATURE", _positive_or_zero, "sampling temperature (0: greedy only)"),
                Knob("BENCH_TOP_P", _fraction, "top-p of the sampled measurement"),
                Knob("BENCH_SWEEP", _int(0), "chain lengths k = 1..K in one table (0: none)"),
                Knob("BENCH_ENGINE_TIMEOUT", SECONDS, "seconds per engine measurement"),
                Knob("BENCH_DEVICE", _text, "specdec_bench's torch device"),
                Knob("BENCH_DTYPE", _choice("float32", "bfloat16", "float16"), "specdec_bench's dtype"),
                *NODE_PYTHON_KNOBS,
            ),
            _check_benchmark,
        ),
    )
}


def entry_script(script: Path | None) -> EntryScript | None:
    """Our contract for a task's script (by its path under the repo), or None (user script / inline)."""
    if script is None:
        return None
    try:
        rel = Path(script).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return None
    return SCRIPTS.get(rel)


def check_task(view: TaskView, script: Path | None) -> None:
    """Check one task against its script's contract (no-op for scripts that are not ours)."""
    contract = entry_script(script)
    if contract is not None:
        contract.check(view, contract)
