"""Job spec schema, overrides, global-var interpolation and error lines (exact field paths)."""

from __future__ import annotations

import pytest

from launcher.spec import load_job
from modelopt_ext.util.errors import ConfigError

# A user's streaming script (not ours, so its arguments are not checked): these tests are about the spec.
SCRIPT = "tests/launcher/fixtures/user_streaming.sh"


def slurm_task(**extra):
    task = {"script": SCRIPT, "slurm_config": {"_factory_": "slurm_factory", "nodes": 4, "time": "01:00:00"}}
    task.update(extra)
    return task


def base(**tasks):
    return {"job_name": "demo", "pipeline": {"global_vars": {"hf_model": "Qwen/Qwen3-8B"}, **tasks}}


def problems(path, overrides=(), environ=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_job(path, overrides, environ=environ or {})
    return e.value.problems


def test_numbered_tasks_run_in_numeric_order_and_env_list_or_dict(write_spec):
    spec = base(
        task_10={"inline": "echo ten"},
        task_2={"inline": "echo two", "environment": [{"A": 1}, {"B": None}, {"C": True}]},
        task_0={"inline": "echo zero", "environment": {"X": "y z"}},
    )
    job = load_job(write_spec(spec), environ={})
    assert [t.name for t in job.tasks] == ["task_0", "task_2", "task_10"]
    assert job.tasks[1].env == {"A": "1", "B": "", "C": "true"}
    assert job.tasks[0].env == {"X": "y z"}
    assert job.kind == "local"


def test_tasks_list_is_accepted_and_skip_is_honoured(write_spec):
    spec = {
        "job_name": "demo",
        "pipeline": {"tasks": [{"inline": "echo a", "skip": True}, {"inline": "echo b"}]},
    }
    job = load_job(write_spec(spec), environ={})
    assert [t.name for t in job.tasks] == ["task_1"] and job.skipped == ["task_0"]


def test_global_vars_substituted_in_args_environment_and_inline(write_spec):
    spec = base(
        task_0=slurm_task(
            args=["model.path=<<global_vars.hf_model>>", 5],
            environment=[{"HF_MODEL_CKPT": "<<global_vars.hf_model>>"}, {"SERVE_NODES": "2"}],
        ),
        task_1={"inline": "echo <<global_vars.hf_model>>", "slurm_config": {"nodes": 1}},
    )
    job = load_job(write_spec(spec), environ={})
    assert job.tasks[0].args == ["model.path=Qwen/Qwen3-8B", "5"]
    assert job.tasks[0].env["HF_MODEL_CKPT"] == "Qwen/Qwen3-8B"
    assert job.tasks[1].inline == "echo Qwen/Qwen3-8B"


def test_unknown_global_var_names_the_field_and_suggests(write_spec):
    spec = base(
        task_0=slurm_task(args=["a", "model.path=<<global_vars.hf_modle>>"], environment={"SERVE_NODES": "2"})
    )
    lines = problems(write_spec(spec))
    assert len(lines) == 1
    assert lines[0].startswith("pipeline.task_0.args[1]: unknown global var 'hf_modle'")
    assert "(did you mean 'hf_model'?)" in lines[0]


def test_every_problem_at_once_one_line_each_with_paths(write_spec):
    spec = base(
        task_0={
            "script": "common/missing.sh",
            "slurm_config": {"nodes": "four", "segmnt": 2, "time": "soon", "srun_args": ["--mpi pmix"]},
        },
        task_1={"inline": "echo", "args": ["x"]},
        taks_2={"inline": "echo"},
    )
    spec["jbo_dir"] = "/x"
    lines = problems(write_spec(spec))
    joined = "\n".join(lines)
    assert "pipeline.task_0.slurm_config.nodes: Input should be a valid integer" in joined
    assert "pipeline.task_0.slurm_config.segmnt: unknown key (did you mean 'segment'?)" in joined
    assert "pipeline.task_0.slurm_config.time: 'soon' is not a Slurm time" in joined
    assert "pipeline.task_0.slurm_config.srun_args: item [0] '--mpi pmix' must be one word" in joined
    assert "pipeline.task_1: 'args' are only used with 'script'" in joined
    assert "pipeline.taks_2: unknown key (did you mean 'task_2'?)" in joined
    assert "jbo_dir: unknown key (did you mean 'job_dir'?)" in joined
    assert len(lines) == 7, lines


def test_missing_script_and_topology_reported_together(write_spec):
    spec = base(
        task_0={"script": "common/nope.sh", "slurm_config": {"nodes": 1}},
        task_1=slurm_task(environment={"SERVE_NODES": "1"}, slurm_config={"nodes": 4, "segment": 2}),
    )
    lines = problems(write_spec(spec))
    assert lines[0].startswith("pipeline.task_0.script: file not found: common/nope.sh")
    assert lines[1].startswith("pipeline.task_1.slurm_config.segment: segment=2 makes 2 segments but only 1")
    assert len(lines) == 2


def test_serve_nodes_from_env_or_field_and_conflicts(write_spec):
    job = load_job(write_spec(base(task_0=slurm_task(serve_nodes=2))), environ={})
    assert job.tasks[0].plan.env()["SERVE_NODE_IDS"] == "0,1"
    lines = problems(write_spec(base(task_0=slurm_task(serve_nodes=2, environment={"SERVE_NODES": "3"}))))
    assert lines == ["pipeline.task_0.serve_nodes: 2 disagrees with environment.SERVE_NODES=3; set only one"]
    lines = problems(write_spec(base(task_0=slurm_task(environment={"SERVE_NODES": "two"}))))
    assert lines == ["pipeline.task_0.environment.SERVE_NODES: must be a whole number (got 'two')"]
    lines = problems(write_spec(base(task_0=slurm_task(environment={"SERVE_NODES": "4"}))))
    assert lines[0].startswith("pipeline.task_0.environment.SERVE_NODES: 4 serve nodes leave no trainer")


def test_streaming_task_needs_one_task_per_node(write_spec):
    task = slurm_task(serve_nodes=1)
    task["slurm_config"]["ntasks_per_node"] = 8
    lines = problems(write_spec(base(task_0=task)))
    assert lines == [
        (
            "pipeline.task_0.slurm_config.ntasks_per_node: a streaming task runs one entry script per node "
            "(it starts its own ranks); allowed: 1 (got 8)"
        )
    ]


def test_overrides_apply_and_misspelled_override_gets_did_you_mean(write_spec):
    path = write_spec(base(task_0=slurm_task(serve_nodes=2)))
    job = load_job(
        path, ["pipeline.task_0.slurm_config.nodes=6", "pipeline.task_0.slurm_config.segment=3"], environ={}
    )
    assert job.tasks[0].slurm.nodes == 6 and job.tasks[0].plan.serve_ids == (0, 3)
    lines = problems(path, ["pipeline.task_0.slurm_config.segmnet=2"])
    assert lines[0].startswith("pipeline.task_0.slurm_config.segmnet: unknown key (did you mean 'segment'?)")
    assert problems(path, ["pipeline.task_0.slurm_config.segment=3"]) == [
        (
            "pipeline.task_0.slurm_config.segment: 3 does not divide nodes=4 (nodes % segment must be 0); "
            "allowed here: 2, 4"
        )
    ]


def test_factory_defaults_come_from_slurm_env_vars(write_spec):
    path = write_spec(base(task_0=slurm_task(serve_nodes=1)))
    env = {
        "SLURM_ACCOUNT": "acct",
        "SLURM_PARTITION": "batch",
        "SLURM_QOS": "high",
        "SLURM_MEM": "0",
        "SLURM_HOST": "login",
    }
    cfg = load_job(path, environ=env).tasks[0].slurm
    assert (cfg.account, cfg.partition, cfg.qos, cfg.mem, cfg.host) == ("acct", "batch", "high", "0", "login")
    cfg = load_job(path, ["pipeline.task_0.slurm_config.partition=debug"], environ=env).tasks[0].slurm
    assert cfg.partition == "debug"  # the spec wins over the factory default


def test_reserved_env_mixed_executors_and_factory_name(write_spec):
    spec = base(
        task_0={"inline": "echo", "environment": {"MODELOPT_SCRATCH": "/x"}},
        task_1={"inline": "echo", "slurm_config": {"_factory_": "slurm_factry"}},
    )
    lines = problems(write_spec(spec))
    assert lines == [
        "pipeline.task_1.slurm_config._factory_: got 'slurm_factry'; allowed: 'slurm_factory'",
        "pipeline.task_0.environment.MODELOPT_SCRATCH: set by the launcher for every task; remove it",
    ]
    lines = problems(
        write_spec(base(task_0={"inline": "echo"}, task_1={"inline": "echo", "slurm_config": {}}))
    )
    assert lines[0].startswith("pipeline: mixes local and slurm tasks")
    lines = problems(write_spec(base(task_0={"inline": "echo", "executor": "local", "slurm_config": {}})))
    assert lines == ["pipeline.task_0: executor 'local' does not use 'slurm_config' (remove one of them)"]


def test_bad_environment_shapes(write_spec):
    lines = problems(write_spec(base(task_0={"inline": "echo", "environment": [{"A": 1, "B": 2}]})))
    assert lines == [
        "pipeline.task_0.environment: item [0] must be a single 'NAME: value' mapping (got {'A': 1, 'B': 2})"
    ]
    lines = problems(write_spec(base(task_0={"inline": "echo", "environment": {"1BAD": "x"}})))
    assert lines == [
        "pipeline.task_0.environment: '1BAD' is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
    ]


def test_yaml_and_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job_name: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_job(bad, environ={})
    assert len(e.value.lines()) == 1 and "invalid YAML" in e.value.lines()[0]
    with pytest.raises(ConfigError) as e:
        load_job(tmp_path / "none.yaml", environ={})
    assert e.value.lines()[0].endswith("none.yaml: file not found")


def test_tasks_of_one_pipeline_submit_to_one_host(write_spec):
    spec = base(
        task_0={"inline": "echo", "slurm_config": {"host": "login-a"}},
        task_1={"inline": "echo", "slurm_config": {"host": "login-b"}},
    )
    lines = problems(write_spec(spec))
    assert len(lines) == 1 and lines[0].startswith("pipeline: tasks submit to different Slurm hosts")
    assert "pipeline.task_1.slurm_config.host='login-b'" in lines[0]
