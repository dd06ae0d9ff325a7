"""A dump from serve_target (`data.mode=remote`): draft-vocabulary probabilities stored instead of hidden states,
equal to what the colocated source resolves to; a run with another draft vocabulary is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from modelopt_ext.supply.target_server.handler import TargetHandler
from modelopt_ext.supply.target_server.http_server import TargetServer
from modelopt_ext.targets.head import resolve_target
from modelopt_ext.training.dump import dump_supervision
from modelopt_ext.util.errors import ConfigError

from .test_offline import _setup


@pytest.fixture
def target_server(small_target):
    model = AutoModelForCausalLM.from_pretrained(small_target, dtype=torch.float32)
    handler = TargetHandler(model, [1, 2, 3], model_name="t")
    srv = TargetServer(handler, "127.0.0.1", 0)
    srv.start_in_thread()
    yield srv.url
    srv.close()
    handler.close()


def test_remote_dump_stores_draft_probs_equal_to_colocated(make_recipe, target_server, tmp_path):
    remote = make_recipe(f"data.server_urls=[{target_server}]", "data.mode=remote")
    res = dump_supervision(remote, tmp_path / "d", dtype="float32", samples_per_shard=4, log=lambda m: None)
    assert res.index is not None
    ds, vocab, colocated = _setup(make_recipe())
    _, _, offline = _setup(make_recipe(f"data.offline_dir={tmp_path / 'd'}"))
    assert offline.head is None  # probabilities need no target head
    for i in range(len(ds)):
        a = colocated.source(colocated.collate([colocated.dataset[i]]))
        b = offline.source(offline.collate([offline.dataset[i]]))
        assert b.target_probs is not None and b.target_probs.shape[-1] == len(vocab.d2t)
        pa, ma = resolve_target(a, colocated.head, vocab)
        pb, mb = resolve_target(b, None, vocab)
        assert torch.equal(a.aux_hidden_states, b.aux_hidden_states)
        assert torch.equal(pa, pb) and torch.equal(ma, mb)
    with pytest.raises(ConfigError) as e:
        _setup(make_recipe(f"data.offline_dir={tmp_path / 'd'}", "eagle.draft_vocab_size=150"))
    assert "(draft_vocab: dump has" in e.value.lines()[0]
