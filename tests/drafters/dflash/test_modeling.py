"""DFlash model: vLLM's weight names, the block mask and KV-injection attention against brute force,
one-forward cached block drafting against the training forward and a step-by-step reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelopt_ext.drafters.dflash.modeling import (
    DFlashConfig,
    DFlashDraftModel,
    block_mask,
    blocks_attention,
)
from tests.model.conftest import VOCAB, tiny_llama_config, tiny_target

H = 128


def make_draft(seed=0, block_size=4, num_layers=2, aux=(1, 2, 3), kv_heads=2, **kw) -> DFlashDraftModel:
    torch.manual_seed(seed)
    cfg = DFlashConfig.from_target_config(
        tiny_llama_config(num_key_value_heads=kv_heads, **kw), list(aux), num_layers=num_layers,
        block_size=block_size, mask_token_id=VOCAB - 1,
    )  # fmt: skip
    model = DFlashDraftModel(cfg).eval()
    with torch.no_grad():  # larger-than-default weights, so attention patterns are not washed out
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    target = tiny_target(seed=seed + 1, num_key_value_heads=kv_heads)
    model.set_target_tensors(target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    return model


def _batch(b=2, t=11, n_aux=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 1, (b, t), generator=g), torch.randn(b, t, n_aux * H, generator=g)


def test_state_dict_keys_are_vllms_names():
    model = make_draft(num_layers=2)
    per_layer = [
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
    ]  # fmt: skip
    expected = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    expected |= {f"layers.{i}.{k}" for i in range(2) for k in per_layer}
    sd = model.state_dict()
    assert set(sd) == expected  # no embed_tokens / lm_head / mask_embedding: the target's are used
    assert sd["fc.weight"].shape == (H, 3 * H)
    assert sd["layers.0.self_attn.q_norm.weight"].shape == (64,)


def test_config_round_trip_and_vllm_numbering():
    cfg = make_draft(aux=(1, 3)).config
    assert cfg.target_layer_ids == [0, 2] and cfg.aux_layer_ids == [1, 3]
    again = DFlashConfig.from_dict(cfg.to_dict())
    assert again == cfg
    exported = {**{k: v for k, v in cfg.to_dict().items() if k not in ("target_layer_ids", "mask_token_id")},
                "dflash_config": {"target_layer_ids": [0, 2], "mask_token_id": VOCAB - 1}}  # fmt: skip
    assert DFlashConfig.from_dict(exported) == cfg


def test_block_mask_matches_brute_force():
    anchors = torch.tensor([[0, 3, 7], [2, 2, 5]])
    t, bs = 9, 4
    m = block_mask(anchors, t, bs)
    assert m.shape == (2, 1, 12, 9 + 12)
    for b in range(2):
        for q in range(12):
            for k in range(t + 12):
                blk = q // bs
                want = k < anchors[b, blk] if k < t else (k - t) // bs == blk
                assert bool(m[b, 0, q, k]) == bool(want), (b, q, k)


def _dense_reference(q, k_ctx, v_ctx, k_blk, v_blk, anchors, bs, scaling):
    """Each block separately: softmax over [context < anchor ; its own block], fp64, loops."""
    b, nh, nq, d = q.shape
    g = nh // k_ctx.shape[1]
    out = torch.zeros(b, nh, nq, d, dtype=torch.float64)
    for bi in range(b):
        for i in range(anchors.shape[1]):
            a = int(anchors[bi, i])
            sl = slice(i * bs, (i + 1) * bs)
            for h in range(nh):
                kh = torch.cat([k_ctx[bi, h // g, :a], k_blk[bi, h // g, sl]]).double()
                vh = torch.cat([v_ctx[bi, h // g, :a], v_blk[bi, h // g, sl]]).double()
                s = q[bi, h, sl].double() @ kh.T * scaling
                out[bi, h, sl] = torch.softmax(s, -1) @ vh
    return out


@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_kv_injection_attention_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    b, nh, nkv, d, t, bs = 2, 4, 2, 8, 10, 3
    anchors = torch.tensor([[0, 4, 9], [1, 1, 6]])
    q = torch.randn(b, nh, 3 * bs, d, generator=g)
    k_ctx, v_ctx = torch.randn(b, nkv, t, d, generator=g), torch.randn(b, nkv, t, d, generator=g)
    k_blk, v_blk = torch.randn(b, nkv, 3 * bs, d, generator=g), torch.randn(b, nkv, 3 * bs, d, generator=g)
    got = blocks_attention(q, k_ctx, v_ctx, k_blk, v_blk, anchors, bs, 0.3, chunk=chunk)
    want = _dense_reference(q, k_ctx, v_ctx, k_blk, v_blk, anchors, bs, 0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def _one_block_uncached(model, ids, aux, a):
    """Reference: rebuild everything from scratch for a single block at anchor a (no cache, no mask:
    the context is cut to positions < a), written with the layers' pieces directly."""
    bs = model.config.block_size
    blk = torch.full((1, bs), model.config.mask_token_id)
    blk[0, 0] = ids[0, a]
    x = model.embed(blk)
    ctx = model.hidden_norm(model.fc(aux[:, :a]))
    pos_ctx = torch.arange(a)[None]
    pos_blk = torch.arange(a, a + bs)[None]
    for layer in model.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        cs_b = model.rotary_emb(h, pos_blk)
        q = attn.queries(h, cs_b)
        kb, vb = attn.keys_values(h, cs_b)
        if a:
            kc, vc = attn.keys_values(ctx, model.rotary_emb(ctx, pos_ctx))
            kb, vb = torch.cat([kc, kb], 2), torch.cat([vc, vb], 2)
        g = q.shape[1] // kb.shape[1]
        kb, vb = kb.repeat_interleave(g, 1), vb.repeat_interleave(g, 1)
        o = torch.softmax(q @ kb.transpose(2, 3) * attn.scaling, -1) @ vb
        x = x + attn.o_proj(o.transpose(1, 2).reshape(1, bs, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.logits(model.norm(x))[:, 1:]


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_training_forward_equals_per_block_reference(kv_heads):
    model = make_draft(kv_heads=kv_heads)
    ids, aux = _batch(b=1)
    anchors = torch.tensor([[0, 3, 5, 10]])
    hidden = model(ids, aux, anchors).view(1, 4, 4, -1)
    for i, a in enumerate(anchors[0].tolist()):
        want = _one_block_uncached(model, ids, aux, a)
        torch.testing.assert_close(model.logits(hidden[:, i, 1:]), want, atol=1e-4, rtol=1e-4)


def test_cached_one_forward_block_equals_training_forward_and_reference():
    """Inference: context committed in pieces (as specdec does), one forward per block == the training
    forward's block at the same anchor == the uncached reference."""
    model = make_draft()
    ids, aux = _batch(b=1, t=11)
    cache = model.new_cache()
    committed = 0
    for a in (0, 3, 4, 8):  # anchors; the context is committed up to each anchor in uneven pieces
        if a > committed:
            model.extend(cache, aux[:, committed:a])
            committed = a
        assert cache.length == a
        got = model.draft_block(cache, ids[:, a : a + 1], a)
        hidden = model(ids, aux, torch.tensor([[a]]))
        torch.testing.assert_close(got, model.logits(hidden[:, 1:]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got, _one_block_uncached(model, ids, aux, a), atol=1e-4, rtol=1e-4)


def test_blocks_do_not_see_context_at_or_after_their_anchor():
    """Context at or after the anchor changes nothing; the anchor token reaches every block position."""
    model = make_draft()
    ids, aux = _batch(b=1)
    anchors = torch.tensor([[5]])
    base = model(ids, aux, anchors)
    aux2 = aux.clone()
    aux2[:, 5:] += 1.0
    torch.testing.assert_close(model(ids, aux2, anchors), base)
    ids2 = ids.clone()
    ids2[0, 5] = (ids[0, 5] + 1) % (VOCAB - 1)  # the anchor token: every position depends on it
    assert not torch.allclose(model(ids2, aux, anchors)[0, 1], base[0, 1])


def test_gradients_reach_every_draft_weight():
    model = make_draft().train()
    ids, aux = _batch()
    out = model(ids, aux, torch.tensor([[1, 6], [0, 9]]))
    F.mse_loss(out, torch.zeros_like(out)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
