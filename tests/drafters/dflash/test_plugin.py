"""DFlash as a plugin: settings, layer rule (vs the references' values), bad recipes (exit 2).

Serve flags and the export format are tested in tests/export (deploy/, drafters/dflash/hf_format.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelopt_ext.config.recipe import load_recipe, parse_recipe
from modelopt_ext.drafters import drafter_for_config, resolve_drafter
from modelopt_ext.drafters.dflash import (
    DFLASH,
    DFlashSettings,
    default_gamma,
    default_layer_ids,
    default_mask_token_id,
)
from modelopt_ext.drafters.layers import drafter_layer_ids
from modelopt_ext.util.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]


def test_registered_and_recognised():
    assert resolve_drafter("dflash") is DFLASH
    assert drafter_for_config({"drafter": "dflash"}) is DFLASH
    exported = {"architectures": ["DFlashDraftModel"], "dflash_config": {"target_layer_ids": [1, 9]}}
    assert drafter_for_config(exported) is DFLASH
    assert drafter_for_config({"architectures": ["LlamaForCausalLMEagle3"]}).name == "eagle3"


def test_layer_rule_matches_the_references():
    # z-lab build_target_layer_ids / Model-Optimizer: DFlash ids 1..L-3; ours are vLLM ids (+1).
    assert default_layer_ids(36, 5) == [2, 10, 18, 26, 34]  # Qwen3-8B: dflash_config [1, 9, 17, 25, 33]
    assert default_layer_ids(61, 5) == [2, 16, 31, 45, 59]  # Kimi-K2.5: Model-Optimizer's capture ids
    assert default_layer_ids(28, 1) == [15]
    assert default_layer_ids(4, 5) == [2]  # shallow targets: repeats collapse
    # ... and through the one owner of layer ids
    assert drafter_layer_ids(36, None, DFLASH, DFlashSettings()) == [2, 10, 18, 26, 34]
    assert DFLASH.layer_ids_of({"target_layer_ids": [1, 9]}) == [2, 10]
    assert DFLASH.layer_ids_of({"dflash_config": {"target_layer_ids": [0]}}) == [1]


def test_gamma_defaults():
    assert default_gamma(16) == 7 and default_gamma(8) == 4 and default_gamma(10) == 5
    assert DFlashSettings(block_size=16).gamma() == 7
    assert DFlashSettings(block_size=8, loss_gamma=2.5).gamma() == 2.5
    assert default_gamma(22) == 9


def test_default_mask_token_id():
    class Tok:
        mask_token_id = None

        def __len__(self):
            return 151669

    assert default_mask_token_id(151936, Tok()) == 151669  # Qwen3: the first unused row
    Tok.mask_token_id = 7
    assert default_mask_token_id(151936, Tok()) == 7
    assert default_mask_token_id(1000) == 999


def _recipe(**dflash) -> dict:
    return {
        "drafter": "dflash",
        "model": {"path": "t"},
        "data": {"path": "d.jsonl"},
        "dflash": dflash,
        "training": {"output_dir": "o"},
    }


def test_settings_validation_names_the_field():
    with pytest.raises(ConfigError) as e:
        parse_recipe(_recipe(block_size=1, mask_token_id=-1, blok_size=3))
    lines = e.value.lines()
    assert any(line.startswith("dflash.block_size:") for line in lines)
    assert any(line.startswith("dflash.mask_token_id:") for line in lines)
    assert any("dflash.blok_size: unknown key" in line for line in lines)
    with pytest.raises(ConfigError) as e:
        parse_recipe({**_recipe(), "eagle": {"ttt_steps": 3}})
    assert any("eagle: settings of the eagle3 drafter, but drafter is dflash" in x for x in e.value.lines())


def test_shipped_recipes_validate():
    for name in ("tiny", "qwen3_8b", "kimi_k25_streaming"):
        r = load_recipe(REPO / "recipes" / "dflash" / f"{name}.yaml")
        assert r.drafter == "dflash"
    assert load_recipe(REPO / "recipes/dflash/qwen3_8b.yaml").drafter_settings.block_size == 16


@pytest.fixture
def target_folder(tmp_path) -> Path:
    """A target's config.json is all the early checks read."""
    folder = tmp_path / "target"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": 4, "vocab_size": 1024, "hidden_size": 128})
    )
    return folder


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("dflash.block_size=1", "dflash.block_size: Input should be greater than or equal to 2 (got 1)"),
        ("dflash.mask_token_id=1024", "dflash.mask_token_id: 1024 is outside the target's vocabulary [0, 1024)"),
        (
            "model.aux_layer_ids=[1,9]",
            "model.aux_layer_ids: layer ids [9] outside [0, 4] for a 4-layer target (vLLM numbering)",
        ),
    ],
)
def test_bad_dflash_recipe_is_one_line_exit_2(tmp_path, target_folder, override, line):
    recipe = tmp_path / "r.yaml"
    data = _recipe()
    data["model"]["path"] = str(target_folder)
    data["data"]["path"] = str(tmp_path / "d.jsonl")
    data["training"]["output_dir"] = str(tmp_path / "out")
    recipe.write_text(yaml.safe_dump(data))
    for module in ("modelopt_ext.train", "modelopt_ext.job_info"):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--config", str(recipe), override],
            cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 2, (module, proc.stderr)
        assert proc.stderr.strip().splitlines() == [f"error: {recipe}: {line}"], (module, proc.stderr)
