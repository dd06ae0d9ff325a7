"""TargetHandler without sockets: parity with the colocated source, validation, per-client state, locking."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from modelopt_ext.drafters.eagle3 import default_aux_layer_ids
from modelopt_ext.supply.target_server.handler import TargetHandler
from modelopt_ext.targets.head import probs_from_logits
from modelopt_ext.targets.supervision import Supervision

from .conftest import AUX, HIDDEN, LAYERS, VOCAB, assert_same_supervision, make_batch


def _sup(reply) -> Supervision:
    assert reply.status == 200, reply.meta
    return Supervision(**reply.tensors)


def test_model_info_and_embeddings(handler, tiny_model):
    info = handler.dispatch("model_info").meta
    assert info["num_layers"] == LAYERS and info["hidden_size"] == HIDDEN and info["vocab_size"] == VOCAB
    assert info["aux_layer_ids"] == AUX and info["dtype"] == "float32" and info["model"] == "tiny"
    emb = handler.dispatch("input_embeddings").tensors["embed_tokens"]
    assert torch.equal(emb, tiny_model.get_input_embeddings().weight)
    assert handler.dispatch("health").meta["status"] == "ok"


def test_generate_equals_colocated_bit_for_bit(handler, colocated, batch):
    reply = handler.dispatch("generate", {}, batch, "c1")
    assert reply.meta["transport"] == "wire" and reply.meta["target_form"] == "logits"
    assert_same_supervision(_sup(reply), colocated(batch))
    assert reply.meta["bytes_per_sample"] == _sup(reply).nbytes() / 3


def test_generate_probs_over_draft_vocab(handler, colocated, batch):
    ids = torch.arange(0, VOCAB, 2)  # every other token: some argmaxes fall outside the draft vocab
    assert handler.dispatch("set_vocab_mapping", {}, {"selected_token_ids": ids}, "c1").meta == {
        "draft_vocab_size": VOCAB // 2
    }
    reply = handler.dispatch("generate", {"target_form": "probs"}, batch, "c1")
    sup = _sup(reply)
    ref = colocated(batch)
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[ids] = True
    expect = probs_from_logits(ref.target_logits, SimpleNamespace(selected_ids=ids, t2d=t2d))
    assert sup.target_logits is None and sup.target_probs.dtype == torch.float32
    assert torch.equal(sup.target_probs, expect)
    assert (sup.target_probs.sum(-1) == 0).any() and (sup.target_probs.sum(-1) > 0).any()
    assert torch.equal(sup.aux_hidden_states, ref.aux_hidden_states)
    m = reply.meta
    assert m["bytes_per_sample"] == m["bytes_per_sample_probs"] < m["bytes_per_sample_logits"]
    # The logits form with a mapping set reports the same pair of costs.
    m2 = handler.dispatch("generate", {"target_form": "logits"}, batch, "c1").meta
    assert m2["bytes_per_sample"] == m2["bytes_per_sample_logits"] == m["bytes_per_sample_logits"]


def test_vocab_mapping_is_per_client_and_disconnect_drops_only_that_client(handler, batch):
    handler.dispatch("set_vocab_mapping", {}, {"selected_token_ids": torch.arange(10)}, "a")
    handler.dispatch("set_vocab_mapping", {}, {"selected_token_ids": torch.arange(20)}, "b")
    assert (
        handler.dispatch("generate", {"target_form": "probs"}, batch, "a").tensors["target_probs"].shape[-1]
        == 10
    )
    assert handler.dispatch("disconnect", {}, None, "a").meta == {"disconnected": True, "clients": 1}
    assert handler.dispatch("generate", {"target_form": "probs"}, batch, "a").status == 409
    assert (
        handler.dispatch("generate", {"target_form": "probs"}, batch, "b").tensors["target_probs"].shape[-1]
        == 20
    )


def test_t2d_alone_sets_the_mapping(handler, batch):
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[[3, 5, 7]] = True
    assert handler.dispatch("set_vocab_mapping", {}, {"t2d": t2d}, "a").meta["draft_vocab_size"] == 3


BAD_REQUESTS = [
    ("generate", {}, {"input_ids": torch.zeros(2, 3, dtype=torch.int64)}, "c", 400, "needs tensors"),
    ("generate", {}, {**make_batch(), "input_ids": make_batch()["input_ids"].int()}, "c", 400, "int64"),
    (
        "generate",
        {},
        {**make_batch(), "loss_mask": make_batch()["loss_mask"].long()},
        "c",
        400,
        "loss_mask must be bool",
    ),
    ("generate", {}, {**make_batch(), "input_ids": make_batch()["input_ids"] + VOCAB}, "c", 400, "outside"),
    ("generate", {"target_form": "topk"}, make_batch(), "c", 400, "target_form"),
    ("generate", {"target_form": "probs"}, make_batch(), "c", 409, "set_vocab_mapping first"),
    ("generate", {"transport": "carrier pigeon"}, make_batch(), "c", 400, "transport"),
    ("set_vocab_mapping", {}, {"selected_token_ids": torch.tensor([1, 1])}, "c", 400, "duplicates"),
    ("set_vocab_mapping", {}, {"selected_token_ids": torch.tensor([VOCAB])}, "c", 400, "outside"),
    ("set_vocab_mapping", {}, {"t2d": torch.ones(3, dtype=torch.bool)}, "c", 400, "t2d must be bool"),
    ("set_vocab_mapping", {}, {"selected_token_ids": torch.tensor([1])}, None, 400, "client id"),
    ("init_nccl", {"backend": "mpi"}, None, "c", 400, "backend"),
    ("disconnect", {}, None, None, 400, "client id"),
    ("health", {}, None, "bad id with spaces", 400, "client id"),
    ("reboot", {}, None, "c", 404, "unknown endpoint"),
]


@pytest.mark.parametrize("endpoint, meta, tensors, client, status, fragment", BAD_REQUESTS)
def test_bad_requests_get_4xx_with_one_line(handler, endpoint, meta, tensors, client, status, fragment):
    reply = handler.dispatch(endpoint, meta, tensors, client)
    assert reply.status == status, reply.meta
    assert fragment in reply.meta["error"] and "\n" not in reply.meta["error"]


def test_too_many_tokens_is_413(tiny_model):
    h = TargetHandler(tiny_model, AUX, compute=lambda b: None, max_batch_tokens=10)
    assert h.dispatch("generate", {}, make_batch(2, 6), "c").status == 413


def test_internal_error_is_500_and_the_handler_keeps_serving(tiny_model, colocated, batch):
    calls = []

    def flaky(b):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory\nwith a second line")
        return colocated(b)

    h = TargetHandler(tiny_model, AUX, compute=flaky)
    reply = h.dispatch("generate", {}, batch, "c")
    assert (
        reply.status == 500
        and reply.meta["error"] == "internal error in generate: RuntimeError: out of memory"
    )
    assert_same_supervision(Supervision(**h.dispatch("generate", {}, batch, "c").tensors), colocated(batch))


def test_forward_is_serialised_across_threads(tiny_model, colocated, batch):
    active, peak = [0], [0]
    lock = threading.Lock()

    def compute(b):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        out = colocated(b)
        with lock:
            active[0] -= 1
        return out

    h = TargetHandler(tiny_model, AUX, compute=compute)
    replies = []
    threads = [
        threading.Thread(target=lambda: replies.append(h.dispatch("generate", {}, batch, "c")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(replies) == 4 and all(r.status == 200 for r in replies)
    assert peak[0] == 1


def test_aux_layer_ids_are_validated(tiny_model):
    with pytest.raises(ValueError, match=r"outside \[0, 4\]"):
        TargetHandler(tiny_model, [1, 9], compute=lambda b: None)
    assert TargetHandler(tiny_model, None, compute=lambda b: None).aux_layer_ids == default_aux_layer_ids(
        LAYERS
    )


def test_init_nccl_without_a_data_plane_says_so(tiny_model):
    h = TargetHandler(tiny_model, AUX, compute=lambda b: None)
    assert h.dispatch("init_nccl", {"backend": "gloo"}, None, "c").meta == {
        "data_plane": False,
        "reason": "this server has no data plane",
    }
