"""Tiny random Llama targets and draft heads for the model tests (CPU, fp32, milliseconds)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modelopt_ext.data.draft_vocab import DraftVocab
from modelopt_ext.drafters.eagle3.modeling import Eagle3Config, Eagle3DraftModel
from modelopt_ext.targets.tiny import tiny_llama_config as tiny_shape

VOCAB = 300


def tiny_llama_config(**kw) -> LlamaConfig:
    """The shared tiny shape (head_dim 64 like vLLM's CPU build needs) at this suite's vocabulary."""
    return tiny_shape(**{"vocab_size": VOCAB, "max_position_embeddings": 512, **kw})


def tiny_target(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**kw)).eval()
    # Random init gives near-uniform logits; scaling the head makes greedy choices clear-cut (no near ties).
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def tiny_draft(seed: int = 0, draft_vocab_size: int | None = None, aux=(1, 2, 4), **kw) -> Eagle3DraftModel:
    torch.manual_seed(seed)
    cfg = Eagle3Config.from_target_config(tiny_llama_config(**kw), list(aux), draft_vocab_size)
    model = Eagle3DraftModel(cfg).eval()
    # Larger-than-default weights so attention patterns and step-to-step differences are not washed out.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p is not model.embed_tokens.weight:
                p.mul_(3.0)
    return model


@pytest.fixture
def draft() -> Eagle3DraftModel:
    return tiny_draft()


def IdentityVocab(target_ids, vocab_size: int) -> DraftVocab:
    """The DraftVocab selecting `target_ids` (in that draft order) out of `vocab_size`."""
    ids = torch.as_tensor(target_ids, dtype=torch.long)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return DraftVocab(d2t=ids - torch.arange(len(ids)), t2d=t2d)


@pytest.fixture
def saved_target(tmp_path):
    """A tiny target saved in HF layout (single safetensors file); returns (model, folder)."""
    model = tiny_target(seed=3)
    folder = tmp_path / "target"
    model.save_pretrained(folder)
    return model, folder
