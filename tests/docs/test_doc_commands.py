"""Docs that are tested: every command shown in README.md, docs/*.md and the example/recipe headers is checked.

Where commands are found:
- fenced blocks labelled bash/sh/shell/console: every line (`\\` continuations joined, `# comments` dropped);
- unlabelled fenced blocks, indented lines and inline `code` spans: lines that start like a command
  (`uv run`, `python`, `accelerate launch`, `.venv/bin/python`, `launch.py`, `tests/...sh`);
- the leading `#` comment block of examples/**/*.yaml and recipes/**/*.yaml.
`uv run X` is run as X through this interpreter (sys.executable), as `uv run` would.

What happens to each command (the rule, in this order):
1. CHEAP: it contains one of CHEAP_FLAGS (`--help`, `--dryrun`, `--print-only`) and no placeholder
   (`TARGET`, `RECIPE.yaml`, `[--opt]`, `<dir>`, `$VAR`): it is RUN as written, from a sandbox folder that
   links the repo's files, with the artifacts a reader would have built first made by `_fixtures`; it must
   exit 0 (or as EXPECTED_FAILURES says, for commands the docs show being refused).
2. A `launch.py` job command that is not cheap (a submit, the quickstart run) is VALIDATED: it is run with
   `--dryrun` added, which validates the spec and its overrides and renders every script, submitting nothing.
3. Any other command of ours (a module, a script) is CHECKED: its `--help` must work and name every `--flag`
   the docs use (accelerate's own flags against `accelerate launch --help`), repo paths it names must exist,
   and a recipe with dotted overrides must load (`load_recipe`).
4. SKIPPED: only the commands in SKIPPED, each with its reason. Anything else fails the test as unclassified.
A failure names the doc file and line.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHEAP_FLAGS = {"--help", "--dryrun", "--print-only"}

# Commands the docs show being refused: (a substring of the command, exit code, a substring of stderr).
EXPECTED_FAILURES = [
    ("pipeline.task_1.slurm_config.segment=3", 2, "does not divide nodes=4"),
    # docs/migrating.md shows a Model-Optimizer spec being refused with our replacements.
    ("modelopt_qwen3_8b_streaming_multi_node.yaml --dryrun", 2, "Model-Optimizer's"),
]

# Programs we do not run or check here, with the reason. Keyed by the program's name.
SKIPPED = {
    "uv": "sets up environments (uv sync / uv pip ...): package downloads and minutes, not a cheap command",
    "pip": "installs packages: package downloads and minutes, not a cheap command",
    "git": "clones or checks out: not a command of this project",
    "cd": "a shell built-in: nothing to check",
    "export": "a shell built-in: nothing to check",
    "docker": "builds or runs container images: a container runtime and downloads, not here",
    "apptainer": "builds or runs container images: a container runtime and downloads, not here",
    "enroot": "imports container images: a container runtime and downloads, not here",
    "hf": "downloads models from the hub: no downloads in tests",
    "huggingface-cli": "downloads models from the hub: no downloads in tests",
    "srun": "a Slurm client: needs a cluster (tests/slurm starts one and uses it)",
    "squeue": "a Slurm client: needs a cluster (tests/slurm starts one and uses it)",
    "scancel": "a Slurm client: needs a cluster (tests/slurm starts one and uses it)",
    "module:vllm.entrypoints.openai.api_server": "vLLM's own server, in vLLM's environment, not ours "
    "(tests/vllm starts it through serve_hidden_states)",
    "sinfo": "a Slurm client through the local test cluster's wrappers (tests/slurm starts and uses them)",
    "sbatch": "a Slurm client through the local test cluster's wrappers (tests/slurm starts and uses them)",
    "torchrun": "starts one rank per GPU; the module it runs (modelopt_ext.dump) is checked where the docs show "
    "it with python -m",
}

_SHELL_LANGS = {"bash", "sh", "shell", "console"}
_STARTS = re.compile(
    r"^(?:[A-Za-z_][A-Za-z0-9_]*=(?:\"[^\"]*\"|'[^']*'|\S*)\s+)*"
    r"(?:uv run\b|python3?\b|accelerate launch\b|\.venv/bin/python\b|launch\.py\b|tests/\S+\.sh\b)"
)
# A span that only names the runner (`uv run`) is prose, not a command.
_INLINE = re.compile(r"`((?:uv run|python3? -m|accelerate launch|\.venv/bin/python)\s+[^`\s][^`]*)`")
_UV_RUN_FLAGS = {"--no-sync", "--locked", "--frozen", "--no-dev", "--offline"}
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PLACEHOLDER = re.compile(r"[\[\]<>|$]|^[A-Z][A-Z0-9_]*(?:\.[a-z]+)?(?:/.*)?$|\.\.\.")
_REPO_PATH = re.compile(r"^(?:examples|recipes|common|tests|docs|launcher|modelopt_ext)/")


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    text: str  # as written, continuations joined


def _logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join `\\` continuations: [(first line number, joined text)]."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, line in lines:
        if not buf:
            start = n
        stripped = line.strip()
        if stripped.endswith("\\"):
            buf += stripped[:-1].rstrip() + " "
            continue
        out.append((start, buf + stripped))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def extract_markdown(path: Path) -> list[DocCommand]:
    """Commands in a markdown file: fenced shell blocks, command-like lines elsewhere, inline spans."""
    rel = path.relative_to(REPO)
    cmds: list[DocCommand] = []
    lang: str | None = None
    block: list[tuple[int, str]] = []
    prose: list[tuple[int, str]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            if lang is None:
                lang, block = line.strip()[3:].strip().lower(), []
                continue
            for start, text in _logical_lines(block):
                text = text.removeprefix("$ ")
                if not text or text.startswith("#"):
                    continue
                if lang in _SHELL_LANGS or (lang == "" and _STARTS.match(text)):
                    cmds.append(DocCommand(f"{rel}:{start}", text))
            lang = None
            continue
        if lang is not None:
            block.append((n, line))
            continue
        prose.append((n, line))
        for m in _INLINE.finditer(line):
            cmds.append(DocCommand(f"{rel}:{n}", m.group(1)))
    # Indented command lines outside fences (with their indented continuations).
    indented = [(n, line) for n, line in prose if line.startswith(("    ", "\t"))]
    for start, text in _logical_lines(indented):
        if _STARTS.match(text):
            cmds.append(DocCommand(f"{rel}:{start}", text))
    return cmds


def extract_yaml_header(path: Path) -> list[DocCommand]:
    """Commands in the leading `#` comment block of a job spec or recipe."""
    rel = path.relative_to(REPO)
    header: list[tuple[int, str]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.startswith("#"):
            break
        header.append((n, line[1:]))
    return [
        DocCommand(f"{rel}:{start}", text) for start, text in _logical_lines(header) if _STARTS.match(text)
    ]


def all_doc_commands() -> list[DocCommand]:
    """Every command shown in the docs, README and example/recipe headers, in file order."""
    cmds = extract_markdown(REPO / "README.md")
    for md in sorted((REPO / "docs").glob("*.md")):
        cmds += extract_markdown(md)
    for spec in sorted([*(REPO / "examples").rglob("*.yaml"), *(REPO / "recipes").rglob("*.yaml")]):
        if not spec.is_symlink():  # recipes/eagle3/quickstart.yaml is tiny.yaml under another name
            cmds += extract_yaml_header(spec)
    return cmds


# --- turning a doc command into argv -------------------------------------------------------------------------


@dataclass
class Parsed:
    env: dict[str, str]
    program: str  # "module:<name>", "script:<path>", "shell:<path>", or a bare program name
    argv: list[str]  # what to run (this interpreter for python)
    args: list[str]  # the program's own arguments
    launcher_args: list[str]  # accelerate launch's own arguments (else empty)


def parse(text: str) -> Parsed:
    """The doc command as argv for this interpreter (`uv run`, `python`, `accelerate launch` normalised)."""
    tokens = shlex.split(text, comments=True)
    env: dict[str, str] = {}
    while tokens and _ENV.match(tokens[0]):
        k, _, v = tokens.pop(0).partition("=")
        env[k] = v
    if tokens[:2] == ["uv", "run"]:
        tokens = tokens[2:]
        while tokens and tokens[0] in _UV_RUN_FLAGS:  # uv's own switches, e.g. `uv run --no-sync X`
            tokens.pop(0)
    prog, rest = tokens[0], tokens[1:]
    py = sys.executable
    if prog in ("python", "python3", ".venv/bin/python") and rest[:1] == ["-m"]:
        return Parsed(env, f"module:{rest[1]}", [py, "-m", *rest[1:]], rest[2:], [])
    if prog.endswith(".py"):
        return Parsed(env, f"script:{prog}", [py, prog, *rest], rest, [])
    if prog == "accelerate" and rest[:1] == ["launch"]:
        rest = rest[1:]
        i = rest.index("-m") if "-m" in rest else len(rest)
        module = rest[i + 1] if i < len(rest) else ""
        argv = [py, "-m", "accelerate.commands.launch", *rest]
        return Parsed(env, f"module:{module}" if module else "accelerate", argv, rest[i + 2 :], rest[:i])
    if prog == "pytest":
        return Parsed(env, "pytest", [py, "-m", "pytest", *rest], rest, [])
    if "/" in prog and prog.endswith(".sh"):
        return Parsed(env, f"shell:{prog}", [str(REPO / prog), *rest], rest, [])
    return Parsed(env, prog, tokens, rest, [])


def has_placeholder(args: list[str]) -> bool:
    """A synopsis or template, not a command to run as written."""
    return any(_PLACEHOLDER.search(a) for a in args)


def _flags(args: list[str]) -> list[str]:
    """`--flag` names used, synopsis brackets included (`[--limit N]`), up to a bare `--` (what follows
    belongs to another program, e.g. vLLM's own arguments)."""
    out = []
    for a in args:
        if a.strip("[]") == "--":
            break
        out += re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", a)
    return out


# --- running -----------------------------------------------------------------------------------------------


def _run(
    argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False
    )


@functools.cache
def _help_text(program: str) -> tuple[int, str]:
    """(exit code, stdout + stderr) of the program's --help, run from the repo root."""
    kind, _, name = program.partition(":")
    if kind == "module":
        argv = [sys.executable, "-m", name, "--help"]
    elif kind == "script":
        argv = [sys.executable, name, "--help"]
    elif kind == "shell":
        argv = [str(REPO / name), "--help"]  # our shell scripts print their usage (and exit non-zero)
    elif program == "accelerate":
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--help"]
    else:
        raise AssertionError(program)
    r = _run(argv, REPO, {"PYTHONPATH": str(REPO)}, timeout=120)
    return r.returncode, r.stdout + r.stderr


def _sandbox(tmp: Path) -> Path:
    """A folder that looks like a fresh checkout (links to the repo's files) plus what readers build first."""
    box = tmp / "checkout"
    box.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("outputs", "runs", ".git") and not entry.name.startswith(".venv"):
            (box / entry.name).symlink_to(entry)
    _fixtures(box)
    return box


def tiny_run_last_checkpoint(world_size: int = 1, recipe: str = "recipes/eagle3/tiny.yaml") -> str:
    """The checkpoint a full run of a tiny recipe ends with, named by the trainer's own code."""
    from modelopt_ext.config.recipe import load_recipe
    from modelopt_ext.targets.tiny import DEFAULT_NUM_CONVERSATIONS
    from modelopt_ext.training.checkpoint import checkpoint_name
    from modelopt_ext.training.sampler import ResumableShardedSampler

    t = load_recipe(REPO / recipe, []).training
    sampler = ResumableShardedSampler(
        DEFAULT_NUM_CONVERSATIONS, batch_size=t.batch_size, world_size=world_size, grad_accum=t.grad_accum
    )
    # The trainer bumps the epoch after an epoch's last step, so step S is in epoch (S - 1) // steps_per_epoch.
    return checkpoint_name((t.max_steps - 1) // sampler.steps_per_epoch, t.max_steps)


def _fixtures(box: Path) -> None:
    """What a docs reader has built before the cheap commands: the tiny run's last checkpoint (as a folder the
    serve commands recognise as a training checkpoint; --print-only reads nothing else)."""
    ckpt = box / "outputs/tiny/eagle3" / tiny_run_last_checkpoint()
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "config.json").write_text('{"aux_layer_ids": [1, 2, 3]}')
    # The DFlash run's: the serve commands read its drafter and block size from config.json.
    ckpt = box / "outputs/tiny/dflash" / tiny_run_last_checkpoint(recipe="recipes/dflash/tiny.yaml")
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "config.json").write_text('{"drafter": "dflash", "block_size": 8, "target_layer_ids": [0, 1, 2]}')


def _expected_failure(text: str) -> tuple[int, str] | None:
    for needle, code, message in EXPECTED_FAILURES:
        if needle in text:
            return code, message
    return None


def _env(p: Parsed, box: Path) -> dict[str, str]:
    """The docs' literal variables (SLURM_ACCOUNT=my_account), not shell templates ($PATH, <dir>); jobs are
    written under the sandbox whatever the docs' MODELOPT_JOB_DIR; nothing is downloaded."""
    literal = {k: v for k, v in p.env.items() if not _PLACEHOLDER.search(v)}
    return {**literal, "MODELOPT_JOB_DIR": str(box / "jobs"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def launch_key(p: Parsed, box: Path) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]] | None:
    """For a launch.py command without placeholders (rules 1 and 2): (its arguments, --dryrun added unless it is
    cheap already; its environment). None for anything else."""
    if p.program != "script:launch.py" or has_placeholder(p.args):
        return None
    args = p.args if CHEAP_FLAGS & set(p.args) else [*p.args, "--dryrun"]
    return tuple(args), tuple(sorted(_env(p, box).items()))


# launch.py's main() for each job command, in ONE process: nemo_run's import (~5 s) is paid once instead of
# once per command; each command still goes through the entry point's own argument parsing and exit code.
_LAUNCH_DRIVER = """
import contextlib, io, json, os, sys
sys.path.insert(0, os.environ["DOCS_TEST_REPO"])
from launcher.cli import main
results = []
for args, env in json.load(sys.stdin):
    saved = dict(os.environ)
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    os.environ.clear()
    os.environ.update(saved)
    results.append([rc, err.getvalue()])
json.dump(results, sys.stdout)
"""


def run_launch_commands(keys: list, box: Path) -> dict:
    """{launch_key: (exit code, stderr)} for every key, run by launch.py's main() from the sandbox."""
    import json

    payload = json.dumps([[list(args), dict(env)] for args, env in keys])
    r = subprocess.run(
        [sys.executable, "-c", _LAUNCH_DRIVER], input=payload, cwd=box, capture_output=True, text=True,
        timeout=600, check=False, env={**os.environ, "DOCS_TEST_REPO": str(REPO)},
    )  # fmt: skip
    assert r.returncode == 0, f"the launch driver failed: {r.stderr[-2000:]}"
    return {k: tuple(v) for k, v in zip(keys, json.loads(r.stdout))}


def rule_of(p: Parsed) -> str:
    """Which rule of the module docstring applies: 'run', 'dryrun', 'check' or 'skip'."""
    if p.program in SKIPPED:
        return "skip"
    cheap = bool(CHEAP_FLAGS & set(p.args)) and not has_placeholder(p.args + p.launcher_args)
    if cheap:
        return "run"
    if p.program == "script:launch.py" and not has_placeholder(p.args):
        return "dryrun"
    return "check"


def check_command(cmd: DocCommand, box: Path, launched: dict) -> str | None:
    """None when the command is fine, else the problem (one line, without the location).

    `launched`: run_launch_commands' results for the launch.py commands."""
    try:
        p = parse(cmd.text)
    except (ValueError, IndexError) as e:
        return f"cannot parse ({e})"
    name = p.program.partition(":")[2] or p.program
    rule = rule_of(p)
    if rule == "skip":
        return None
    want = _expected_failure(cmd.text)
    # 1. cheap: run as written; 2. a job command: its dry run validates it
    key = launch_key(p, box)
    if rule in ("run", "dryrun"):
        if key is not None:
            rc, err = launched[key]
        else:
            r = _run(p.argv, box, _env(p, box))
            rc, err = r.returncode, r.stderr
        if want is None and rc != 0:
            last = (err.strip().splitlines() or ["(no stderr)"])[-1]
            dry = "" if CHEAP_FLAGS & set(p.args) else "its --dryrun "
            return f"{dry}exit {rc}: {last}"
        if want is not None and (rc != want[0] or want[1] not in err):
            return f"expected exit {want[0]} with {want[1]!r}, got {rc}: {err.strip()[-300:]}"
        return None
    # 3. anything else of ours: --help names the flags, paths exist, recipe overrides load
    problems = []
    if p.program.startswith(("module:", "script:", "shell:")) or p.program in ("accelerate", "pytest"):
        if p.program == "pytest":
            problems += [
                f"{a}: no such path" for a in p.args if _REPO_PATH.match(a) and not (REPO / a).exists()
            ]
            return "; ".join(problems) or None
        if p.program.startswith("shell:") and not (REPO / name).is_file():
            return f"{name}: no such script"
        rc, text = _help_text(p.program)
        if p.program.startswith(("module:", "script:")) and rc != 0:
            return f"`{name} --help` exits {rc}: {text.strip().splitlines()[-1:]}"
        problems += [f"{f} not in `{name} --help`" for f in _flags(p.args) if not _mentions(text, f)]
        sub = p.args[0] if p.program.startswith("shell:") and p.args else "-"
        if not sub.startswith("-") and not _mentions(text, sub):
            problems.append(f"subcommand {p.args[0]!r} not in {name}'s usage")
        if p.launcher_args:
            n = (
                p.launcher_args[p.launcher_args.index("--num_processes") + 1]
                if "--num_processes" in p.launcher_args
                else "1"
            )
            if n != "1" and "--multi_gpu" not in p.launcher_args:  # accelerate would start ONE process on CPU
                problems.append(
                    f"--num_processes {n} without --multi_gpu runs a single process on a CPU machine"
                )
            _, acc = _help_text("accelerate")
            problems += [
                f"{f} not in `accelerate launch --help`"
                for f in _flags(p.launcher_args)
                if not _mentions(acc, f)
            ]
        problems += [
            f"{a}: no such file"
            for a in p.args
            if _REPO_PATH.match(a) and not _PLACEHOLDER.search(a) and not (REPO / a).exists()
        ]
        if name in ("modelopt_ext.train", "modelopt_ext.job_info") and "--config" in p.args:
            problems += _recipe_problems(p.args)
        return "; ".join(problems) or None
    return f"unclassified command {p.program!r}: give it a rule in this test or a SKIPPED entry with a reason"


def _mentions(text: str, word: str) -> bool:
    """`word` (a flag or subcommand) appears in a help text as a whole word (`--out` is not `--output`)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _recipe_problems(args: list[str]) -> list[str]:
    from modelopt_ext.config.recipe import load_recipe
    from modelopt_ext.util.errors import ConfigError

    config = args[args.index("--config") + 1]
    if _PLACEHOLDER.search(config):
        return []
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        load_recipe(REPO / config, overrides)
    except ConfigError as e:
        return [f"recipe {config} with {overrides}: {'; '.join(e.lines())}"]
    return []


# --- tests -------------------------------------------------------------------------------------------------


def test_extraction_finds_the_commands_we_know_are_there():
    """The extractor itself: blocks, continuations, indented and inline commands, yaml headers."""
    texts = {c.text: c.where for c in all_doc_commands()}
    readme = [t for t, w in texts.items() if w.startswith("README.md:")]
    assert "uv run launch.py --yaml examples/local/quickstart.yaml   # local quickstart" in readme[0]
    kimi = (
        "uv run launch.py --yaml examples/moonshotai/Kimi-K2.5/hf_streaming_dflash_multi_node.yaml --dryrun "
        "pipeline.task_1.slurm_config.segment=3"
    )
    assert texts[kimi].startswith("examples/moonshotai/Kimi-K2.5/hf_streaming_dflash_multi_node.yaml:")
    serve_sglang = [t for t in texts if "serve_sglang --target Qwen/Qwen3-8B" in t]
    assert serve_sglang and serve_sglang[0].endswith("-- --mem-fraction-static 0.8")  # continuation joined
    assert any(w.startswith("docs/export.md:") and "--print-only" in t for t, w in texts.items())
    assert "uv run python -m modelopt_ext.telemetry.plot OUTPUT" in texts  # an inline span
    assert all(not t.startswith("step ") for t in texts)  # log output in unlabelled blocks is not a command


def test_classification_rule():
    assert has_placeholder(["--target", "TARGET"]) and has_placeholder(["--config", "RECIPE.yaml"])
    assert has_placeholder(["[--limit", "N]"]) and has_placeholder(["--yaml", "examples/<org>/x.yaml"])
    assert has_placeholder(["--resume", "OUTPUT/epoch_0_step_200"]) and has_placeholder(
        ["--threads", "1", "..."]
    )
    assert not has_placeholder(["--yaml", "examples/local/quickstart.yaml", "--dryrun", "a.b=3"])
    p = parse(
        "uv run accelerate launch --multi_gpu --num_processes 2 -m modelopt_ext.train --config r.yaml x=1"
    )
    assert p.program == "module:modelopt_ext.train"
    assert p.launcher_args == ["--multi_gpu", "--num_processes", "2"] and p.args == [
        "--config",
        "r.yaml",
        "x=1",
    ]
    assert p.argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert _flags(["--a", "--b=1", "[--c]", "[--", "--d"]) == ["--a", "--b", "--c"]
    assert _mentions("usage: x [--out OUT]", "--out") and not _mentions("usage: x [--output O]", "--out")


def test_the_tiny_run_ends_at_the_checkpoint_the_docs_name():
    """docs/export.md names the tiny run's last checkpoint; the trainer's naming code must agree."""
    name = tiny_run_last_checkpoint()
    assert name == "epoch_1_step_300"
    assert f"outputs/tiny/eagle3/{name}" in (REPO / "docs/export.md").read_text()


def test_every_example_spec_is_named_in_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "examples").rglob("*.yaml"))
        if str(p.relative_to(REPO)) not in readme
    ]
    assert not missing, f"README.md does not name {missing}"


def test_documented_commands_work(tmp_path):
    """Every documented command passes its check (see the module docstring); failures name file:line."""
    box = _sandbox(tmp_path)
    unique: dict[str, DocCommand] = {}
    for c in all_doc_commands():
        unique.setdefault(c.text, c)  # the same command in several places is checked once (first place named)
    cmds = list(unique.values())
    assert len(cmds) > 40, f"only {len(cmds)} commands found: is the extractor broken?"
    parsed = {c.text: parse(c.text) for c in cmds}
    keys = sorted({k for t in parsed if (k := launch_key(parsed[t], box)) is not None})
    launched = run_launch_commands(keys, box)
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        results = list(pool.map(lambda c: check_command(c, box, launched), cmds))
    rules = Counter(rule_of(parsed[c.text]) for c in cmds)
    skipped = sorted({parsed[c.text].program for c in cmds if rule_of(parsed[c.text]) == "skip"})
    print(
        f"\ndocumented commands: {len(cmds)} distinct; {rules['run']} run as written, {rules['dryrun']} job "
        f"commands validated by a dry run ({len(keys)} launch.py runs), {rules['check']} checked against "
        f"--help/paths/recipes, {rules['skip']} skipped ({', '.join(skipped) or 'none'})"
    )
    failures = [f"{c.where}: {c.text}\n    -> {problem}" for c, problem in zip(cmds, results) if problem]
    assert not failures, f"{len(failures)} documented command(s) fail:\n" + "\n".join(failures)
