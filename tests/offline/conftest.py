"""Fixtures of the offline-supervision tests: one small real target (briefly fitted Llama + tokenizer) per
session, a conversations file, and recipes pointing at them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "streaming"))  # fake_vllm: the vLLM hidden-state contract on loopback


@pytest.fixture(scope="session")
def small_target(tmp_path_factory) -> Path:
    """A real Llama target folder (4 layers x 128, vocab 1024, tokenizer with chat template); barely fitted:
    the tests check numbers, not quality."""
    from modelopt_ext.targets.tiny import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("target") / "t", fit_steps=2, corpus_size=400)


@pytest.fixture(scope="session")
def conversations(tmp_path_factory) -> Path:
    from modelopt_ext.targets.tiny import write_tiny_conversations

    return Path(write_tiny_conversations(tmp_path_factory.mktemp("data") / "conv.jsonl", 10, seed=3))


@pytest.fixture
def make_recipe(small_target, conversations, tmp_path):
    """recipe(*overrides) -> Recipe on the small target and the conversations (fp32 target, 3 ttt steps)."""
    from modelopt_ext.config.recipe import load_recipe

    def make(*overrides: str):
        return load_recipe(
            REPO / "recipes" / "eagle3" / "tiny.yaml",
            [
                f"model.path={small_target}",
                f"data.path={conversations}",
                f"data.cache_dir={tmp_path / 'cache'}",
                f"data.shared_storage_root={tmp_path / 'hs'}",
                f"training.output_dir={tmp_path / 'out'}",
                "eagle.draft_vocab_size=200",
                *overrides,
            ],
        )

    return make
