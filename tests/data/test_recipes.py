"""Every shipped EAGLE-3 recipe validates, and the entry script's server URLs switch it to streaming."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelopt_ext.config.recipe import load_recipe
from modelopt_ext.drafters.eagle3 import default_aux_layer_ids

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "eagle3"
ALL = sorted(RECIPES.glob("*.yaml"))
# Decoder layers of the real targets (their config.json), to check the aux ids follow the default rule.
REAL_LAYERS = {"Qwen3-8B.yaml": 36, "Llama-3.1-8B.yaml": 32, "Kimi-K2.5.yaml": 61}


def test_the_expected_recipes_exist():
    names = {p.name for p in ALL}
    assert {"tiny.yaml", *REAL_LAYERS} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_recipe_validates(path):
    r = load_recipe(path)
    assert r.data.mode == "colocated"  # no server URLs until the entry script adds them
    streaming = load_recipe(path, ["data.server_urls=[http://10.0.0.1:8765,http://10.0.0.2:8765]"])
    assert streaming.data.mode == "streaming" and len(streaming.data.server_urls) == 2
    legacy = load_recipe(path, ["data.server_url=http://10.0.0.1:8765,http://10.0.0.2:8765"])
    assert legacy.data.server_urls == streaming.data.server_urls


@pytest.mark.parametrize("name,layers", sorted(REAL_LAYERS.items()))
def test_real_recipes_use_reference_hyper_parameters(name, layers):
    r = load_recipe(RECIPES / name)
    assert r.model.aux_layer_ids == default_aux_layer_ids(layers)
    assert r.drafter_settings.ttt_steps == 7 and r.drafter_settings.draft_vocab_size == 32000
    assert r.training.lr == 1e-4 and r.model.dtype == "bfloat16"
    assert r.data.max_length in (2048, 4096) and r.data.shared_storage_root


def test_tiny_recipe_is_small_and_local():
    r = load_recipe(RECIPES / "tiny.yaml")
    assert r.drafter_settings.ttt_steps == 3 and r.drafter_settings.draft_vocab_size < 1024
    assert r.training.max_steps and r.training.max_steps <= 500
    assert r.training.output_dir.startswith("outputs/") and r.model.dtype == "float32"
