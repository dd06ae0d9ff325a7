"""The drafter interface is the whole contract: a drafter that lives only in tests trains through the real
trainer, colocated (two ranks under `accelerate launch`) and streamed from a real vLLM hidden-state server.

The toy drafter (toy_drafter.py) reads layers [0, L-2], a choice EAGLE-3 never makes, so these tests can
tell that the sources, the server's capture ids and the checkpoint follow the drafter, not EAGLE-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelopt_ext.util.proc import free_port

REPO = Path(__file__).resolve().parents[2]
TOY_RECIPE = Path(__file__).resolve().parent / "toy.yaml"
TOY = "tests.drafters.toy_drafter:ToyDrafter"
TINY_LAYERS = 4  # the tiny target's decoder layers
TOY_LAYERS = [0, TINY_LAYERS - 2]


@pytest.fixture
def repo_on_path(monkeypatch):
    """The recipe names `tests.drafters...`, importable from the repository root (where the trainer runs)."""
    monkeypatch.syspath_prepend(str(REPO))


def test_recipe_picks_the_toy_drafter_and_its_layer_rule(repo_on_path, tmp_path):
    from modelopt_ext.config.recipe import load_recipe
    from modelopt_ext.drafters.layers import recipe_layer_ids
    from modelopt_ext.targets.layers import capture_layer_ids
    from modelopt_ext.util.errors import ConfigError

    recipe = load_recipe(TOY_RECIPE)
    assert recipe.drafter == TOY and recipe.drafter_settings.draft_vocab_size == 128
    assert recipe_layer_ids(recipe, TINY_LAYERS) == TOY_LAYERS
    assert capture_layer_ids(TINY_LAYERS, recipe_layer_ids(recipe, TINY_LAYERS)) == [*TOY_LAYERS, TINY_LAYERS]
    assert recipe.model_dump(mode="json")["toy"] == {"draft_vocab_size": 128}
    with pytest.raises(ConfigError, match=r"toy\.draft_vocab_sise"):
        load_recipe(TOY_RECIPE, ["toy.draft_vocab_sise=3"])
    with pytest.raises(ConfigError, match=r"eagle: settings of the eagle3 drafter"):
        load_recipe(TOY_RECIPE, ["eagle.ttt_steps=3"])


def test_serve_sglang_asks_the_drafter_and_copies_nothing_it_did_not_ask_for(repo_on_path, tmp_path):
    """deploy/sglang.py is generic: a drafter with no SGLang fixups (the default hook) is served from its folder
    as it is, with its own flags."""
    import torch

    from modelopt_ext.deploy.sglang import plan_sglang
    from modelopt_ext.drafters.hf_folder import write_folder

    folder = write_folder(
        tmp_path / "toy-export",
        {"proj.weight": torch.zeros(4, 6), "proj.bias": torch.zeros(4), "d2t": torch.zeros(4, dtype=torch.long)},
        {"architectures": ["ToyLinearDrafter"], "drafter": TOY, "aux_layer_ids": TOY_LAYERS, "hidden_size": 3,
         "draft_vocab_size": 4},
    )  # fmt: skip
    plan = plan_sglang("org/target", str(folder), options={"token_map": "always", "layer_name": "midlayer"})
    assert plan.copy_from is None and plan.token_map is None and plan.draft_path == str(folder)
    assert plan.argv[plan.argv.index("--speculative-algorithm") + 1] == "TOY"
    assert not (tmp_path / "toy-export-sglang").exists()


def _overrides(target: Path, data: Path, out: Path) -> list[str]:
    return [
        f"model.path={target}",
        f"data.path={data}",
        f"data.cache_dir={out / 'cache'}",
        f"training.output_dir={out}",
    ]


def _curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _check_run(out: Path, steps: int) -> list[dict]:
    """Loss fell; the checkpoint names the toy drafter and its own layers; the export is the toy's format."""
    curve = _curve(out)
    assert curve and curve[-1]["step"] == steps
    assert curve[-1]["loss"] < 0.9 * curve[0]["loss"], [r["loss"] for r in curve]
    (checkpoint,) = out.glob(f"epoch_*_step_{steps}")
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["drafter"] == TOY and config["aux_layer_ids"] == TOY_LAYERS
    export = json.loads((out / "export" / "config.json").read_text())
    assert export["architectures"] == ["ToyLinearDrafter"] and export["aux_layer_ids"] == TOY_LAYERS
    print("\n" + " ".join(f"{r['step']}:{r['loss']:.3f}" for r in curve))
    return curve


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> tuple[Path, Path]:
    from modelopt_ext.targets.tiny import build_tiny_target, write_tiny_conversations

    cache = Path(os.environ.get("MODELOPT_EXT_TEST_CACHE", REPO / ".cache"))
    target = build_tiny_target(cache / "tiny-target")
    data = write_tiny_conversations(tmp_path_factory.mktemp("data") / "conversations.jsonl", 32, seed=1)
    return target, Path(data)


@pytest.mark.e2e
def test_toy_drafter_trains_colocated_under_accelerate(tiny_inputs, tmp_path):
    """Two ranks, the real CLI, the recipe naming a drafter from tests/: nothing in modelopt_ext knows it."""
    target, data = tiny_inputs
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "modelopt_ext.train", "--config", str(TOY_RECIPE), *_overrides(target, data, out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) x batch 2" in proc.stdout
    assert f"target layers {TOY_LAYERS}" in proc.stdout and f"toy: linear head over layers {TOY_LAYERS}" in proc.stdout
    _check_run(out, 12)


@pytest.mark.e2e
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_toy_drafter_trains_streamed_from_vllm_as_colocated(tiny_inputs, tmp_path, repo_on_path):
    """A real vLLM server captures what the toy drafter asked for (its layers, then L); the streamed run's
    losses equal a colocated run's, which they could not if the server had captured other layers."""
    from modelopt_ext.config.recipe import load_recipe
    from modelopt_ext.drafters.layers import recipe_layer_ids
    from modelopt_ext.supply.vllm.server import start_hidden_states_server
    from modelopt_ext.targets.layers import capture_layer_ids, target_num_layers

    target, data = tiny_inputs
    root = tmp_path / "shared"
    recipe = load_recipe(TOY_RECIPE, _overrides(target, data, tmp_path / "probe"))
    capture = capture_layer_ids(target_num_layers(target), recipe_layer_ids(recipe))
    assert capture == [*TOY_LAYERS, TINY_LAYERS]
    t0 = time.monotonic()
    with start_hidden_states_server(
        str(target), shared_storage=root, capture_ids=capture, port=free_port(), dtype="float32",
        max_model_len=512, log_path=tmp_path / "vllm.log", startup_timeout=900,
    ) as server:  # fmt: skip
        print(f"\nvLLM up in {time.monotonic() - t0:.0f} s, capturing {server.capture_ids}")
        assert server.capture_ids == capture
        streamed = tmp_path / "streamed"
        cmd = [
            sys.executable, "-m", "modelopt_ext.train", "--config", str(TOY_RECIPE),
            *_overrides(target, data, streamed), f"data.server_urls=[{server.url}]", f"data.shared_storage_root={root}",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + "\n" + server.log_tail()
    assert "mode streaming" in proc.stdout and f"target layers {TOY_LAYERS}" in proc.stdout
    streamed_curve = _check_run(streamed, 12)

    from modelopt_ext.training.trainer import train

    colocated = tmp_path / "colocated"
    train(load_recipe(TOY_RECIPE, _overrides(target, data, colocated)))
    colocated_curve = _check_run(colocated, 12)
    assert [r["step"] for r in streamed_curve] == [r["step"] for r in colocated_curve]
    worst = max(abs(s["loss"] - c["loss"]) / c["loss"] for s, c in zip(streamed_curve, colocated_curve))
    print(f"worst relative loss difference, streamed vs colocated: {worst:.2e}")
    assert worst <= 1e-4
