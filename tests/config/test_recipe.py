"""Recipe schema: every problem at once, field paths named, legacy keys, derived data mode, redaction."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from modelopt_ext.config.overrides import apply_overrides, load_yaml_file, parse_override
from modelopt_ext.config.recipe import load_recipe, parse_recipe, redacted
from modelopt_ext.drafters.eagle3 import default_aux_layer_ids
from modelopt_ext.util.errors import ConfigError, format_loc

BASE = {"model": {"path": "m"}, "data": {"path": "d.jsonl"}, "training": {"output_dir": "out"}}


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_recipe(data)
    return e.value.problems


def test_minimal_recipe_defaults():
    r = parse_recipe(BASE)
    assert r.data.mode == "colocated"
    assert r.drafter_settings.ttt_steps == 7 and r.training.schedule == "cosine"


def test_every_problem_reported_at_once_with_field_paths():
    bad = {
        "model": {"path": "m", "dtyp": "float32"},
        "data": {"path": "d", "max_length": 0},
        "eagle": {"ttt_steps": 0},
        "training": {"output_dir": "o", "lr": -1, "schedule": "exp"},
    }
    lines = problems(bad)
    assert len(lines) == 5, lines
    joined = "\n".join(lines)
    assert "model.dtyp: unknown key (did you mean 'dtype'?)" in joined
    assert any(line.startswith("data.max_length:") for line in lines)
    assert any(line.startswith("eagle.ttt_steps:") for line in lines)
    assert any(line.startswith("training.lr:") for line in lines)
    assert any(line.startswith("training.schedule:") and "cosine" in line for line in lines)


def test_missing_sections_are_named():
    lines = problems({"model": {"path": "m"}})
    assert sorted(lines) == ["data: required field is missing", "training: required field is missing"]


def test_legacy_server_url_and_deprecated_prefetch():
    data = dict(BASE, data={"path": "d", "server_url": "http://a:1,http://b:2", "streaming_prefetch": 8})
    with pytest.warns(DeprecationWarning, match="streaming_prefetch"):
        r = parse_recipe(data)
    assert r.data.server_urls == ["http://a:1", "http://b:2"]
    assert r.data.mode == "streaming"


@pytest.mark.parametrize(
    "data,mode",
    [
        ({"path": "d"}, "colocated"),
        ({"path": "d", "offline_dir": "dumps"}, "offline"),
        ({"path": "d", "offline_dir": "dumps", "server_urls": ["http://a"]}, "hybrid"),
        ({"path": "d", "server_urls": ["http://a"]}, "streaming"),
        ({"path": "d", "server_urls": ["http://a"], "mode": "remote"}, "remote"),
    ],
)
def test_mode_is_derived_from_the_source(data, mode):
    assert parse_recipe(dict(BASE, data=data)).data.mode == mode


def test_explicit_mode_must_match_the_source():
    lines = problems(dict(BASE, data={"path": "d", "mode": "streaming"}))
    assert len(lines) == 1 and lines[0].startswith("data:") and "data.server_urls" in lines[0]
    lines = problems(
        dict(BASE, data={"path": "d", "offline_dir": "x", "server_urls": ["http://a"], "mode": "remote"})
    )
    assert "hybrid mode (vLLM servers), not remote" in lines[0]
    lines = problems(dict(BASE, data={"path": "d", "offline_dir": "x", "mode": "hybrid"}))
    assert "hybrid needs data.offline_dir and data.server_urls" in lines[0]


def test_aux_layer_ids_validated():
    lines = problems(dict(BASE, model={"path": "m", "aux_layer_ids": [1, 1]}))
    assert lines[0].startswith("model.aux_layer_ids:") and "distinct" in lines[0]


@pytest.mark.parametrize(
    "layers,expected",
    [(36, [2, 18, 33]), (32, [2, 16, 29]), (5, [1, 2, 4]), (4, [1, 2, 3]), (3, [1, 2]), (2, [1])],
)
def test_default_aux_layer_ids(layers, expected):
    assert default_aux_layer_ids(layers) == expected


def test_redaction_masks_secrets_and_survives_non_string_keys():
    out = redacted({1: "a", "hf_token": "abc", "auth_token_file": "/p", "nested": [{"api_key": "k"}]})
    assert out == {"1": "a", "hf_token": "***", "auth_token_file": "/p", "nested": [{"api_key": "***"}]}


def test_overrides_typed_and_nested():
    data = apply_overrides(
        BASE, ["training.lr=3e-4", "eagle.ttt_steps=3", "data.server_urls=[http://a, http://b]"]
    )
    r = parse_recipe(data)
    assert r.training.lr == 3e-4 and r.drafter_settings.ttt_steps == 3 and r.data.server_urls == ["http://a", "http://b"]
    assert BASE["training"] == {"output_dir": "out"}  # input not mutated


def test_override_list_index_and_errors():
    data = apply_overrides({"a": {"b": [1, 2]}}, ["a.b[1]=7"])
    assert data == {"a": {"b": [1, 7]}}
    with pytest.raises(ConfigError) as e:
        apply_overrides({"a": {"b": [1]}}, ["a.b[3]=1", "novalue", "a.b.c=1"])
    assert len(e.value.problems) == 3
    assert parse_override("x.y=") == (["x", "y"], "")


def test_format_loc():
    assert format_loc(("pipeline", "task_1", "args", 0)) == "pipeline.task_1.args[0]"


def test_load_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_yaml_file(str(p))
    assert str(p) in e.value.problems[0] and "invalid YAML" in e.value.problems[0]
    with pytest.raises(ConfigError, match="file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_load_recipe_reports_with_source(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        textwrap.dedent("""
        model: {path: m}
        data: {path: d}
        training: {output_dir: o, lr: 1e-4}
    """)
    )
    r = load_recipe(p, ["training.lr=2e-4"])
    assert r.training.lr == 2e-4
    with pytest.raises(ConfigError) as e:
        load_recipe(p, ["training.lrr=1"])
    assert e.value.lines()[0].startswith(f"{p}: training.lrr: unknown key (did you mean 'lr'?)")


def test_config_package_imports_no_ml_library():
    code = "import sys, modelopt_ext.config.recipe; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_list_of_single_key_mappings_is_addressed_by_key():
    from modelopt_ext.config.overrides import apply_overrides

    data = {"t": {"environment": [{"A": "1"}, {"SERVE_NODES": "2"}]}}
    out = apply_overrides(data, ["t.environment.SERVE_NODES=4", "t.environment.NEW=x", "t.environment[0].A=9"])
    assert out["t"]["environment"] == [{"A": 9}, {"SERVE_NODES": 4}, {"NEW": "x"}]
    assert data["t"]["environment"] == [{"A": "1"}, {"SERVE_NODES": "2"}]  # the input is left alone
    with pytest.raises(ConfigError) as e:
        apply_overrides({"t": {"environment": [{"A": "1"}, {"A": "2"}]}}, ["t.environment.A=4"])
    assert e.value.problems == [
        ("override 't.environment.A=4': cannot set 'A' on a list; address a list item by index, "
        "e.g. t.environment[0].A=...")
    ]


def test_key_problem_names_the_unknown_part_and_the_closest_key():
    from modelopt_ext.config.recipe import Recipe
    from modelopt_ext.util.errors import key_problem

    assert key_problem(Recipe, "training.lr") is None and key_problem(Recipe, "data.server_urls") is None
    assert key_problem(Recipe, "training.lrr").startswith("unknown key (did you mean 'training.lr'?); allowed under training: ")
    assert key_problem(Recipe, "modle.path").startswith("unknown key (did you mean 'model'?); allowed: data, drafter, model")
    from modelopt_ext.config.recipe import recipe_key_problem

    assert recipe_key_problem("modle.path") == (
        "unknown key (did you mean 'model'?); allowed: data, drafter, eagle, model, training"
    )
    assert recipe_key_problem("eagle.ttt_steps") is None and recipe_key_problem("drafter") is None
    assert recipe_key_problem("eagle.ttt_step").startswith("unknown key (did you mean 'eagle.ttt_steps'?); allowed under eagle:")


def test_settings_nobody_reads_are_refused_not_ignored():
    # eagle.num_layers was once accepted and never read (the head is one decoder layer); a key nothing
    # reads must be an error naming it, never silently dropped.
    found = problems({"model": {"path": "m"}, "data": {"path": "d"}, "eagle": {"num_layers": 2}})
    assert (
        "eagle.num_layers: unknown key; allowed keys: attention, draft_vocab_size, freeze_embeddings, "
        "step_loss_decay, ttt_steps"
    ) in found
