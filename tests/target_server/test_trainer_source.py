"""`data.mode: remote`: the trainer's SourceSetup over serve_target gives the loss the same targets as colocated."""

from __future__ import annotations

import pytest
import torch

from modelopt_ext.config.recipe import parse_recipe
from modelopt_ext.data.draft_vocab import DraftVocab
from modelopt_ext.supervision.remote import RemoteTargetError, build_remote_source
from modelopt_ext.supervision.target_head import resolve_target
from modelopt_ext.training.distributed import DistEnv

from .conftest import AUX, VOCAB, make_batch


def _recipe(model_dir, urls, tmp_path, aux=AUX):
    return parse_recipe(
        {
            "model": {"path": str(model_dir), "dtype": "float32", "aux_layer_ids": aux},
            "data": {"path": "unused.jsonl", "server_urls": urls, "mode": "remote"},
            "training": {"output_dir": str(tmp_path / "out")},
        }
    )


def test_remote_source_matches_colocated_targets_bit_for_bit(
    server, tiny_model_dir, tiny_model, colocated, tmp_path
):
    vocab = DraftVocab.from_selected_ids(torch.arange(0, VOCAB, 3), VOCAB)
    recipe = _recipe(tiny_model_dir, ["http://127.0.0.1:9", server.url], tmp_path)
    setup = build_remote_source(recipe, DistEnv(rank=1), ["conversations"], pad_id=0, vocab=vocab)
    assert setup.aux_layer_ids == AUX and setup.head is None and setup.dataset == ["conversations"]
    assert torch.equal(setup.target_embeddings, tiny_model.get_input_embeddings().weight)
    batch = make_batch()
    remote = setup.source(batch)
    assert remote.target_probs is not None and remote.target_probs.shape[-1] == vocab.selected_ids.numel()
    probs_r, mask_r = resolve_target(remote, None, vocab)
    probs_c, mask_c = resolve_target(colocated(batch), None, vocab)
    assert torch.equal(probs_r, probs_c) and torch.equal(mask_r, mask_c)
    assert mask_c.any() and not mask_c.all()
    assert torch.equal(remote.aux_hidden_states, colocated(batch).aux_hidden_states)
    setup.source.close()


def test_remote_source_refuses_a_server_with_other_aux_layers(server, tiny_model_dir, tmp_path):
    with pytest.raises(RemoteTargetError, match=r"aux_layer_ids server=\[1, 2, 3\] expected=\[1, 2\]"):
        build_remote_source(
            _recipe(tiny_model_dir, [server.url], tmp_path, aux=[1, 2]), DistEnv(), [], 0, None
        )
