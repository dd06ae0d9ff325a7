"""ColocatedSource: vLLM layer numbering, pre-norm id L, determinism, loading from a recipe."""

from __future__ import annotations

import pytest
import torch

from modelopt_ext.config.recipe import parse_recipe
from modelopt_ext.supply.colocated import ColocatedSource
from modelopt_ext.targets.head import TargetHead
from tests.model.conftest import VOCAB, tiny_target


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 10), generator=g)
    am = torch.ones(2, 10, dtype=torch.bool)
    am[1, 8:] = False
    return {"input_ids": ids, "attention_mask": am, "loss_mask": am.clone()}


def test_layer_numbering_and_logits():
    model = tiny_target(seed=1)
    src = ColocatedSource(model, [0, 2, 4])
    b = _batch()
    sup = src(b)
    with torch.no_grad():
        hf = model(b["input_ids"], attention_mask=b["attention_mask"].long(), output_hidden_states=True)
    h = 128
    assert sup.aux_hidden_states.shape == (2, 10, 3 * h)
    torch.testing.assert_close(sup.aux_hidden_states[..., :h], hf.hidden_states[0])  # id 0 = embeddings
    torch.testing.assert_close(sup.aux_hidden_states[..., h : 2 * h], hf.hidden_states[2])
    last = sup.aux_hidden_states[..., 2 * h :]
    assert not torch.allclose(last, hf.hidden_states[4])  # id L is NOT HF's post-norm hidden_states[L]
    head = TargetHead.from_model(model)
    torch.testing.assert_close(head.logits(last), hf.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sup.target_logits, hf.logits)
    assert sup.target_probs is None and sup.target_last_hidden is None


def test_deterministic_and_no_grad():
    src = ColocatedSource(tiny_target(seed=2), [1, 2, 3])
    a, b = src(_batch()), src(_batch())
    assert torch.equal(a.aux_hidden_states, b.aux_hidden_states)
    assert torch.equal(a.target_logits, b.target_logits)
    assert not a.target_logits.requires_grad


def test_bad_layer_id():
    with pytest.raises(ValueError, match=r"outside \[0, 4\]"):
        ColocatedSource(tiny_target(), [1, 5])


def test_from_recipe(saved_target, tmp_path):
    _model, folder = saved_target
    recipe = parse_recipe(
        {
            "model": {"path": str(folder), "dtype": "float32"},
            "data": {"path": str(tmp_path / "d.jsonl")},
            "training": {"output_dir": str(tmp_path / "out")},
        }
    )
    src = ColocatedSource.from_recipe(recipe, "cpu")
    assert src.aux_layer_ids == [1, 2, 3]  # default rule for a 4-layer target
    sup = src(_batch())
    assert sup.aux_hidden_states.shape[-1] == 3 * 128
