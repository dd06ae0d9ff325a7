"""A real training checkpoint (written by the trainer's own save_checkpoint) from a tiny Eagle3DraftModel."""

from __future__ import annotations

import pytest
import torch

from modelopt_ext.data.draft_vocab import build_draft_vocab
from modelopt_ext.drafters.eagle3.modeling import Eagle3Config, Eagle3DraftModel
from modelopt_ext.training.checkpoint import CheckpointContent, save_checkpoint
from modelopt_ext.training.distributed import DistEnv

VOCAB, DRAFT_VOCAB = 48, 16


def make_checkpoint(output_dir, draft_vocab: int = DRAFT_VOCAB, seed: int = 0):
    """(checkpoint folder, the model it holds)."""
    torch.manual_seed(seed)
    cfg = Eagle3Config(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=VOCAB,
        draft_vocab_size=draft_vocab,
        aux_layer_ids=[1, 2, 3],
        rope_theta=10000.0,
    )
    model = Eagle3DraftModel(cfg)
    counts = torch.arange(VOCAB).flip(0) * 3 % 17
    vocab = build_draft_vocab(counts, VOCAB, draft_vocab, special_ids=[VOCAB - 1])
    model.set_vocab(vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms away from 1 so a mix-up would show
    content = CheckpointContent(
        model_state=model.state_dict(),
        model_config={**cfg.to_dict(), "target_model": "outputs/tiny/target"},
        vocab=vocab,
        optimizer_state={},
        scheduler_state={},
        trainer_state={"epoch": 0, "global_step": 7, "data_position": 0, "world_size": 1},
        recipe={"model": {"path": "outputs/tiny/target"}},
    )
    return save_checkpoint(output_dir, 0, 7, DistEnv(), content), model


@pytest.fixture()
def checkpoint(tmp_path):
    return make_checkpoint(tmp_path / "run")
