"""Entry-script contracts at validation/dry-run: what would fail on the nodes is refused here (exit 2, one
line per problem, nothing written); Model-Optimizer specs get exact hints and `--migrate` converts them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher import contracts, run_job
from launcher.spec import REPO_ROOT, load_job
from modelopt_ext.util.errors import ConfigError

FIXTURES = Path(__file__).with_name("fixtures")
MO_SPEC = FIXTURES / "modelopt_qwen3_8b_streaming_multi_node.yaml"
QWEN = "examples/Qwen/Qwen3-8B/hf_streaming_eagle3.yaml"
QUICKSTART = "examples/local/quickstart.yaml"


def launch(*args, env_extra=None, timeout=240):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "launch.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


def problems(spec, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_job(spec, overrides, environ={})
    return e.value.problems


def edited(tmp_path: Path, example: str, old: str, new: str) -> Path:
    text = (REPO_ROOT / example).read_text()
    assert old in text
    out = tmp_path / Path(example).name
    out.write_text(text.replace(old, new))
    return out


# ------------------------------------------------------------------------------ Model-Optimizer specs


def test_model_optimizer_example_is_refused_with_one_hint_per_problem(tmp_path):
    jobs = tmp_path / "jobs"
    p = launch("--yaml", str(MO_SPEC), "--dryrun", "--job-dir", str(jobs))
    assert p.returncode == 2, p.stderr
    assert p.stdout == "" and "Traceback" not in p.stderr
    prefix = f"error: {MO_SPEC}: "
    lines = [ln.removeprefix(prefix) for ln in p.stderr.splitlines()]
    assert all(ln.startswith(prefix) for ln in p.stderr.splitlines())
    assert lines == [
        (
            "pipeline.task_0.script: common/eagle3/make_dataset.sh: not part of this project; stage a conversations "
            "JSONL into $MODELOPT_SCRATCH (an inline copy task, as in our examples; docs/data.md); see docs/migrating.md"
        ),
        (
            "pipeline.task_1.environment.HF_MODEL_CKPT: Model-Optimizer's knob; not read here: the target is the "
            "recipe's model.path (args: model.path=...); see docs/migrating.md"
        ),
        (
            "pipeline.task_1.args[0]: --config modules/Model-Optimizer/modelopt_recipes/general/speculative_decoding/"
            "eagle3.yaml: Model-Optimizer's recipe; use ours: --config recipes/eagle3/Qwen3-8B.yaml "
            "(recipes/eagle3/ has one per target); see docs/migrating.md"
        ),
        "pipeline.task_1.args[1]: model.model_name_or_path: Model-Optimizer's name; use model.path",
        (
            "pipeline.task_1.args[2]: data.mode: set by the streaming entry script (its data.server_urls make the mode "
            "streaming; SERVE_ENGINE=target makes it remote): remove it"
        ),
        "pipeline.task_1.args[3]: data.data_path: Model-Optimizer's name; use data.path",
        "pipeline.task_1.args[5]: training.training_seq_len: Model-Optimizer's name; use data.max_length",
        (
            "pipeline.task_1.args[6]: training.disable_tqdm: Model-Optimizer's key; no equivalent here (progress is "
            "printed as plain lines with rate and ETA): remove it; see docs/migrating.md"
        ),
        (
            "pipeline.task_1.args[7]: training.ar_validate_steps: Model-Optimizer's key; no equivalent here "
            "(acceptance is measured by the benchmark task): remove it; see docs/migrating.md"
        ),
        "pipeline.task_1.args[8]: training.num_train_epochs: Model-Optimizer's name; use training.epochs",
        (
            "pipeline.task_1.args[9]: eagle.eagle_use_torch_compile: Model-Optimizer's key; no equivalent here "
            "(not configurable): remove it; see docs/migrating.md"
        ),
        (
            "pipeline.task_2.script: common/specdec_bench/quick_check.sh: Model-Optimizer's script; use "
            "common/eagle3/benchmark.sh OUTPUT TARGET PROMPTS.jsonl; see docs/migrating.md"
        ),
    ]
    assert not jobs.exists()  # nothing rendered, nothing written


def _hf_local(tmp_path: Path, layers: int = 36) -> Path:
    """A host folder as `hf_local` mounts it, with a readable Qwen3-8B config (no weights needed)."""
    root = tmp_path / "hf-local"
    (root / "Qwen/Qwen3-8B").mkdir(parents=True)
    (root / "Qwen/Qwen3-8B/config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    return root


def test_migrate_prints_and_writes_a_spec_that_dry_runs_cleanly(tmp_path, cli_reporting_torch):
    src = tmp_path / "mo.yaml"
    src.write_text(MO_SPEC.read_text())
    printed = launch("--migrate", str(src))
    assert printed.returncode == 0, printed.stderr
    written = launch("--migrate", str(src), "--write")
    out = tmp_path / "mo.migrated.yaml"
    assert written.returncode == 0 and f"wrote {out}" in written.stdout
    assert out.read_text() == printed.stdout
    spec = yaml.safe_load(out.read_text())
    t1 = spec["pipeline"]["task_1"]
    assert t1["args"] == [
        "--config recipes/eagle3/Qwen3-8B.yaml",
        "model.path=<<global_vars.hf_model>>",
        "data.path=${MODELOPT_SCRATCH}/data/train.jsonl",
        "training.output_dir=${MODELOPT_SCRATCH}/eagle3",
        "data.max_length=4096",
        "training.epochs=1",
    ]
    assert t1["environment"] == [
        {"EAGLE_CAPTURE_IDS": "[2,18,33,36]"},
        {"SERVE_TP": "2"},
        {"SERVE_NODES": "2"},
        {"STREAMING_NUM_WORKERS": "4"},
    ]
    assert spec["pipeline"]["task_2"]["script"] == "common/eagle3/benchmark.sh"
    assert "inline" in spec["pipeline"]["task_0"] and "script" not in spec["pipeline"]["task_0"]
    assert "#   pipeline.task_1: model.model_name_or_path -> model.path" in printed.stdout
    assert "#   pipeline.task_1: dropped training.disable_tqdm=true" in printed.stdout
    # The migrated spec dry-runs cleanly where its hf_local folder exists (here a stand-in with the config),
    # and the dry-run (recipe, knobs, capture ids against that config) imports no torch.
    jobs = tmp_path / "jobs"
    hf = _hf_local(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    dry = cli_reporting_torch(
        ["--yaml", str(out), "--dryrun", "--job-dir", str(jobs), "--run-id", "m1", f"hf_local={hf}"], env
    )
    assert dry.returncode == 0, dry.stderr
    assert "TORCH_IMPORTED=False" in dry.stdout
    assert "serve nodes: 0,1" in dry.stdout and "dry run: nothing submitted" in dry.stdout
    # ... and its capture ids are checked against that target's layer count.
    bad = launch(
        "--yaml", str(out), "--dryrun", "--job-dir", str(jobs), f"hf_local={hf}",
        "pipeline.task_1.environment.EAGLE_CAPTURE_IDS=[2,18,33,35]",
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        (
            f"error: {out}: pipeline.task_1.environment.EAGLE_CAPTURE_IDS: [2, 18, 33, 35] must end with the "
            "target's layer count 36 (the last layer, pre-final-norm), after the drafter's layer ids "
            "(/hf-local/Qwen/Qwen3-8B has 36 decoder layers; e.g. [2, 18, 33, 36])"
        )
    ]


def test_migrating_doc_lists_every_model_optimizer_name():
    from launcher import modelopt_compat as mo

    doc = (REPO_ROOT / "docs/migrating.md").read_text()
    names = [*mo.RECIPE_KEYS, *mo.SAME_RECIPE_KEYS, *mo.ENV_KNOBS, *mo.SCRIPTS, *mo.SLURM_KEYS]
    assert [n for n in names if n not in doc] == []
    for ours, _ in mo.RECIPE_KEYS.values():
        assert ours is None or f"`{ours}`" in doc


def test_model_optimizer_slurm_fields_get_hints(write_spec):
    spec = {
        "job_name": "mo",
        "pipeline": {
            "task_0": {
                "inline": "hostname",
                "slurm_config": {"nodes": 1, "modelopt_install_path": "/x", "local": True},
            }
        },
    }
    lines = problems(write_spec(spec))
    assert lines == [
        (
            "pipeline.task_0.slurm_config.modelopt_install_path: unknown key: Model-Optimizer's field; not needed "
            "(our package runs from the repo, MODELOPT_REPO)"
        ),
        (
            "pipeline.task_0.slurm_config.local: unknown key: Model-Optimizer's field; use the task's "
            "`executor: local` instead"
        ),
    ]


# ------------------------------------------------------------------------------ our own examples


def test_training_override_typo_and_missing_recipe_exit_2_with_nothing_written(tmp_path):
    spec = edited(
        tmp_path,
        QWEN,
        "      - --config recipes/eagle3/qwen3_8b_streaming.yaml\n",
        "      - --config recipes/eagle3/qwen3_8b_streaming.yaml\n      - training.lrr=3\n",
    )
    jobs = tmp_path / "jobs"
    p = launch("--yaml", str(spec), "--dryrun", "--job-dir", str(jobs))
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [
        (
            f"error: {spec}: pipeline.task_1.args[1]: training.lrr: unknown key (did you mean 'training.lr'?); "
            "allowed under training: batch_size, compile, dtype, epochs, export_at_end, grad_accum, log_interval, lr, "
            "max_grad_norm, max_steps, output_dir, save_interval, schedule, seed, warmup_steps, weight_decay"
        )
    ]
    missing = edited(
        tmp_path, QWEN, "recipes/eagle3/qwen3_8b_streaming.yaml", "recipes/eagle3/qwen3_8b_streamin.yaml"
    )
    p = launch("--yaml", str(missing), "--yes", "--job-dir", str(jobs))  # submit: refused before anything
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [
        (
            f"error: {missing}: pipeline.task_1.args[0]: --config recipes/eagle3/qwen3_8b_streamin.yaml: recipe not "
            "found (relative to the repo root) (did you mean 'recipes/eagle3/qwen3_8b_streaming.yaml'?)"
        )
    ]
    assert not jobs.exists()


def test_recipe_value_problems_all_at_once_with_the_scripts_own_overrides(tmp_path):
    spec = edited(
        tmp_path,
        QWEN,
        "      - --config recipes/eagle3/qwen3_8b_streaming.yaml\n",
        "      - --config recipes/eagle3/qwen3_8b_streaming.yaml\n      - training.lr=-1\n"
        "      - data.offline_dir=/somewhere\n",
    )
    # With our target server (SERVE_ENGINE=target) the script adds data.mode=remote, which an offline dir
    # contradicts (hybrid mode streams from vLLM servers only): visible only with the script's overrides.
    spec.write_text(
        spec.read_text().replace(
            '      - SERVE_NODES: "1"\n', '      - SERVE_NODES: "1"\n      - SERVE_ENGINE: target\n'
        )
    )
    lines = problems(spec)
    assert lines == [
        (
            "pipeline.task_1.args: recipe recipes/eagle3/qwen3_8b_streaming.yaml: training.lr: Input should be greater than 0 "
            "(got -1)"
        ),
        (
            "pipeline.task_1.args: recipe recipes/eagle3/qwen3_8b_streaming.yaml (with the streaming script's own overrides): "
            "data: data.offline_dir with data.server_urls is hybrid mode (vLLM servers), not remote"
        ),
    ]


def test_typed_knobs_parse_and_the_natural_environment_override_form(tmp_path):
    over = [
        "pipeline.task_1.environment.SERVE_TP=two",
        "pipeline.task_1.environment.STREAMING_NUM_WORKERS=-1",
        "pipeline.task_1.environment.EAGLE_CAPTURE_IDS=2,x",
        "pipeline.task_1.environment.SERVE_START_TIMEOUT_S=10m",
        "pipeline.task_1.environment.SERVE_ENGINE=sglang",
        "pipeline.task_1.environment.SERVE_GPU_MEM_UTIL=1.5",
        "pipeline.task_1.environment.SERVE_NODE=1",
    ]
    lines = problems(REPO_ROOT / QWEN, over)
    assert lines == [
        "pipeline.task_1.environment.SERVE_ENGINE: allowed: vllm, target (got 'sglang')",
        "pipeline.task_1.environment.SERVE_TP: must be a whole number >= 1 (got 'two')",
        "pipeline.task_1.environment.SERVE_GPU_MEM_UTIL: must be a number in (0, 1] (got '1.5')",
        (
            "pipeline.task_1.environment.EAGLE_CAPTURE_IDS: layer ids '2,x': expected comma-separated integers "
            "(got '2,x')"
        ),
        "pipeline.task_1.environment.STREAMING_NUM_WORKERS: must be a whole number >= 0 (got '-1')",
        "pipeline.task_1.environment.SERVE_START_TIMEOUT_S: must be a whole number >= 1 (got '10m')",
        (
            "pipeline.task_1.environment.SERVE_NODE: not a knob of common/eagle3/train_eagle_streaming.sh "
            "(did you mean 'SERVE_NODES'?)"
        ),
    ]
    # environment.NAME=V sets the list item of that name (the spec writes environment as a list).
    job = load_job(REPO_ROOT / QWEN, ["pipeline.task_1.environment.SERVE_TP=1"], environ={})
    assert job.tasks[1].env["SERVE_TP"] == "1" and list(job.tasks[1].env).count("SERVE_TP") == 1


def test_serve_tp_must_leave_gpus_for_the_trainer_on_one_node():
    lines = problems(REPO_ROOT / QWEN, ["pipeline.task_1.environment.SERVE_TP=8"])
    assert lines == [
        (
            "pipeline.task_1.environment.SERVE_TP: 8 leaves no GPU for the trainer on the single node "
            "(gpus_per_node=8); allowed: 1..7"
        )
    ]


def test_local_inputs_exist_unless_an_earlier_task_writes_them(tmp_path):
    tiny = tmp_path / "not-built-yet"
    over = [f"pipeline.global_vars.tiny_dir={tiny}", f"pipeline.global_vars.hf_model={tiny}/target"]
    job = load_job(REPO_ROOT / QUICKSTART, over, environ={})  # task_0 (prepare_tiny.sh) writes them
    assert [t.name for t in job.tasks] == ["task_0", "task_1", "task_2"]
    lines = problems(REPO_ROOT / QUICKSTART, [*over, "pipeline.task_0.skip=true"])
    assert lines == [
        f"pipeline.task_1.args[1]: model.path: target folder not found: {tiny}/target",
        f"pipeline.task_1.args[2]: data.path: conversations file not found: {tiny}/conversations.jsonl",
        f"pipeline.task_2.args[1]: TARGET folder not found: {tiny}/target",
        f"pipeline.task_2.args[2]: PROMPTS file not found: {tiny}/conversations.jsonl",
    ]


def test_scratch_inputs_need_an_earlier_task(tmp_path):
    lines = problems(REPO_ROOT / QWEN, ["pipeline.task_0.skip=true"])
    assert lines == [
        (
            "pipeline.task_1.args[2]: data.path: conversations file ${MODELOPT_SCRATCH}/data/train.jsonl is in the "
            "run's scratch folder, which starts empty: no earlier task of this pipeline writes it"
        )
    ]


def test_capture_ids_against_a_local_target(tmp_path, write_spec):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"num_hidden_layers": 6}))
    data = tmp_path / "conv.jsonl"
    data.write_text("{}\n")
    spec = {
        "job_name": "ids",
        "pipeline": {
            "task_0": {
                "script": "common/eagle3/train_eagle_streaming.sh",
                "args": ["--config recipes/eagle3/tiny.yaml", f"model.path={target}", f"data.path={data}"],
                "environment": {"SERVE_NODES": "1", "EAGLE_CAPTURE_IDS": "1,2,9"},
            }
        },
    }
    assert problems(write_spec(spec)) == [
        (
            "pipeline.task_0.environment.EAGLE_CAPTURE_IDS: layer ids [9] outside [0, 6] for a 6-layer target (vLLM numbering) "
            f"({target} has 6 decoder layers; e.g. [1, 3, 5, 6])"
        )
    ]
    spec["pipeline"]["task_0"]["environment"]["EAGLE_CAPTURE_IDS"] = "[1,2,3,6]"
    assert load_job(write_spec(spec), environ={}).tasks[0].env["EAGLE_CAPTURE_IDS"] == "[1,2,3,6]"
    spec["pipeline"]["task_0"]["environment"]["EAGLE_CAPTURE_IDS"] = "[1,7,6]"
    assert problems(write_spec(spec)) == [
        "pipeline.task_0.environment.EAGLE_CAPTURE_IDS: layer ids [7] outside [0, 6] for a 6-layer "
        f"target (vLLM numbering) ({target} has 6 decoder layers; e.g. [1, 3, 5, 6])"
    ]


def test_user_scripts_and_inline_are_not_second_guessed(write_spec):
    spec = {
        "job_name": "mine",
        "pipeline": {
            "task_0": {"inline": "python -m modelopt_ext.train --config nope.yaml training.lrr=1"},
            "task_1": {
                "script": "tests/launcher/fixtures/user_streaming.sh",
                "args": ["--config nope.yaml", "training.lrr=1"],
                "environment": {"SERVE_TP": "two", "HF_MODEL_CKPT": "x"},
            },
        },
    }
    assert [t.name for t in load_job(write_spec(spec), environ={}).tasks] == ["task_0", "task_1"]


def test_every_registered_script_exists_and_declares_its_knobs():
    for path, script in contracts.SCRIPTS.items():
        own = (REPO_ROOT / path).read_text()
        assert "launcher/contracts.py" in own, path  # the script's header points at its contract
        # What it reads includes the shell libraries it sources (common/lib/python.sh: the node's Python).
        libs = re.findall(r"^source \"\$\{\w+\}/(common/lib/\w+\.sh)\"", own, re.MULTILINE)
        text = own + "".join((REPO_ROOT / lib).read_text() for lib in libs)
        for knob in script.knobs:
            assert knob.name in text, (path, knob.name)  # a declared knob is one the script reads
    doc = (REPO_ROOT / "docs/entry-scripts.md").read_text()
    knobs = {k.name for s in contracts.SCRIPTS.values() for k in s.knobs}
    assert sorted(k for k in knobs if f"`{k}`" not in doc) == []  # ... and users can read about it


# ------------------------------------------------------------------------------ every problem at once


def test_unknown_key_does_not_hide_the_other_problems(write_spec):
    spec = {
        "job_name": "demo",
        "pipeline": {
            "global_vars": {"x": 1},
            "task_0": {
                "script": "common/nope.sh",
                "args": ["<<global_vars.y>>"],
                "environment": {"SERVE_NODES": "abc"},
                "slurm_config": {"nodes": 4, "segmnet": 3, "time": "01:00:00"},
            },
            "task_1": {"inline": "echo", "slurm_config": {"nodes": 2, "host": "other.example"}, "bogus": 1},
        },
    }
    lines = problems(write_spec(spec))
    assert lines[:2] == [
        (
            "pipeline.task_0.slurm_config.segmnet: unknown key (did you mean 'segment'?); allowed keys: _factory_, "
            "account, additional_parameters, array, container, container_mounts, gpus_per_node, host, mem, nodes, "
            "ntasks_per_node, partition, port, qos, requeue, retries, segment, srun_args, time"
        ),
        (
            "pipeline.task_1.bogus: unknown key; allowed keys: args, environment, executor, inline, script, "
            "serve_nodes, skip, slurm_config, streaming"
        ),
    ]
    assert lines[2:] == [
        "pipeline.task_0.args[0]: unknown global var 'y' in '<<global_vars.y>>'; defined in pipeline.global_vars: x",
        f"pipeline.task_0.script: file not found: common/nope.sh (relative to the repo root {REPO_ROOT})",
        "pipeline.task_0.environment.SERVE_NODES: must be a whole number (got 'abc')",
    ]


# ------------------------------------------------------------------------------ run_job from stdin


def test_run_job_from_stdin_runs(write_spec, tmp_path):
    spec = write_spec({"job_name": "hello", "pipeline": {"task_0": {"inline": "echo hello-from-task"}}})
    code = textwrap.dedent(
        f"""
        from launcher import run_job
        r = run_job({str(spec)!r}, mode="submit", job_dir={str(tmp_path / "jobs")!r}, run_id="s1", environ={{}})
        print("STATES", [t.state for t in r.tasks])
        """
    )
    p = subprocess.run(
        [sys.executable, "-"],
        input=code,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert "STATES ['SUCCEEDED']" in p.stdout


def test_nemo_run_failing_before_the_task_leaves_no_folder_behind(write_spec, tmp_path, monkeypatch):
    from launcher.api import LaunchError

    spec = write_spec({"job_name": "hello", "pipeline": {"task_0": {"inline": "echo again"}}})
    import nemo_run

    original = nemo_run.Experiment._save_jobs

    def broken(self):
        raise OSError("could not get source code")

    monkeypatch.setattr(nemo_run.Experiment, "_save_jobs", broken)
    with pytest.raises(LaunchError, match="task_0: could not run it locally: could not get source code"):
        run_job(spec, mode="submit", job_dir=tmp_path, run_id="x1", environ={})
    assert not (tmp_path / "experiments/hello/hello_x1.task_0").exists()
    monkeypatch.setattr(nemo_run.Experiment, "_save_jobs", original)
    result = run_job(spec, mode="submit", job_dir=tmp_path, run_id="x1", environ={})  # the same run id
    assert [t.state for t in result.tasks] == ["SUCCEEDED"]
    with pytest.raises(LaunchError, match="run id 'x1' was already used"):
        run_job(spec, mode="submit", job_dir=tmp_path, run_id="x1", environ={})


# ------------------------------------------------------------------------------ fuzz (bounded)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=8))
_trees = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "b", "environment", "task_0"]), inner, max_size=3),
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_trees, key=st.text(alphabet="ab.[]0_=", min_size=1, max_size=12), value=st.text(max_size=6))
def test_overrides_on_any_tree_apply_or_report_one_line(tree, key, value):
    from modelopt_ext.config.overrides import apply_overrides

    data = {"x": tree}
    try:
        apply_overrides(data, [f"x.{key}={value}"])
    except ConfigError as e:
        assert e.problems and all("\n" not in p for p in e.problems)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pipeline=st.dictionaries(
        st.sampled_from(["task_0", "task_1", "global_vars", "note"]),
        st.one_of(
            _trees,
            st.fixed_dictionaries(
                {
                    "script": st.sampled_from(
                        ["common/eagle3/train_eagle_streaming.sh", "common/eagle3/make_dataset.sh"]
                    )
                },
                optional={"args": st.lists(st.text(max_size=20), max_size=4), "environment": _trees},
            ),
        ),
        max_size=4,
    )
)
def test_migrate_never_crashes_on_odd_specs(pipeline):
    from launcher.modelopt_compat import migrate, render

    out = migrate({"job_name": "x", "pipeline": pipeline})
    assert isinstance(out.spec, dict)
    render(out, "spec.yaml")
