"""A target path (`model.path`, `--target`, `--model`) is resolved in one place; a typo is one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from modelopt_ext.targets.locate import TargetPathError, resolve_target, target_config

REPO = Path(__file__).resolve().parents[2]


def _model_folder(path: Path, layers: int = 6) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return path


def _cached_hub_model(cache: Path, repo_id: str, layers: int = 6) -> Path:
    """The local HF cache layout for `repo_id` with only config.json (what resolution reads)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / ("0" * 40)
    _model_folder(snap, layers)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snap


def test_local_folder_and_cached_hub_id_resolve(tmp_path, monkeypatch):
    folder = _model_folder(tmp_path / "target")
    assert resolve_target(str(folder), "model.path") == folder
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = _cached_hub_model(tmp_path / "hub", "org/tiny-6")
    assert resolve_target("org/tiny-6", "--model") == snap
    assert target_config("org/tiny-6")["num_hidden_layers"] == 6


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("outputs/tiny/targte", "model.path 'outputs/tiny/targte': no such folder (and not a hub id like org/name)"),
        ("./tiny", "model.path './tiny': no such folder (and not a hub id like org/name)"),
        ("org/not-cached", "model.path 'org/not-cached': no such folder, and no hub model of that name in the local"),
    ],
)  # fmt: skip
def test_typos_are_one_line_naming_the_field(tmp_path, monkeypatch, value, message):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TargetPathError) as e:
        resolve_target(value, "model.path")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_folder_without_config_or_a_file_is_not_a_target(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(TargetPathError, match="a folder without config.json"):
        resolve_target(tmp_path / "empty", "--target")
    with pytest.raises(TargetPathError, match="not a folder"):
        resolve_target(tmp_path / "file", "--target")


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )  # fmt: skip


@pytest.fixture
def typo_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model:\n  path: outputs/tiny/targte\n"
        "data:\n  path: outputs/tiny/conversations.jsonl\n"
        "training:\n  output_dir: outputs/tiny/eagle3\n"
    )
    return recipe


@pytest.mark.parametrize("module", ["modelopt_ext.train", "modelopt_ext.job_info"])
def test_recipe_commands_refuse_a_model_path_typo_in_one_line(module, typo_recipe, tmp_path):
    r = _run([module, "--config", str(typo_recipe)], cwd=tmp_path, HF_HUB_CACHE=str(tmp_path / "hub"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {typo_recipe}: model.path 'outputs/tiny/targte': no such folder (and not a hub id like org/name)"
    ]


@pytest.mark.parametrize(
    ("args", "prefix"),
    [
        (["modelopt_ext.serve_target", "--target", "outputs/tiny/targte"], "serve_target: --target"),
        (["modelopt_ext.serve_hidden_states", "--model", "outputs/tiny/targte", "--shared-storage", "s"],
         "error: --model"),
        (["modelopt_ext.serve_hidden_states", "--model", "org/not-cached", "--shared-storage", "s"],
         "error: --model"),
    ],
)  # fmt: skip
def test_server_commands_refuse_a_target_typo_in_one_line(args, prefix, tmp_path):
    r = _run(args, cwd=tmp_path, HF_HUB_CACHE=str(tmp_path / "hub"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prefix} '{args[2]}': no such folder"), r.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was started or written


def test_job_info_resolves_a_cached_hub_id(tmp_path):
    """A hub id in the local cache is a valid model.path (no download): its config gives the layer count."""
    _cached_hub_model(tmp_path / "hub", "org/tiny-6", layers=6)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  path: org/tiny-6\ndata:\n  path: d.jsonl\ntraining:\n  output_dir: out\n")
    r = _run(
        ["modelopt_ext.job_info", "--config", str(recipe)], cwd=tmp_path, HF_HUB_CACHE=str(tmp_path / "hub")
    )
    assert r.returncode == 0, r.stderr
    assert "JOB_TARGET=org/tiny-6" in r.stdout.splitlines()
    assert any(line.startswith("JOB_CAPTURE_IDS=") and line.endswith(",6") for line in r.stdout.splitlines())
