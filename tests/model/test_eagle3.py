"""EAGLE-3 draft head: keys, TTT masks, step 0 == causal forward, TTT == cached inference chain."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modelopt_ext.drafters.eagle3.modeling import (
    DraftCache,
    Eagle3Config,
    Eagle3DraftModel,
    masked_attention,
    shift_left,
    ttt_attention_mask,
)
from tests.model.conftest import VOCAB, tiny_draft, tiny_llama_config

EXPECTED_KEYS = {
    "embed_tokens.weight",
    "fc.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
    "layers.0.input_layernorm.weight",
    "layers.0.hidden_norm.weight",
    "layers.0.post_attention_layernorm.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
}


def _batch(b=2, t=9, seed=1, n_aux=3, h=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    aux = torch.randn(b, t, n_aux * h, generator=g)
    return ids, aux


def test_state_dict_keys_and_shapes(draft):
    sd = draft.state_dict()
    assert set(sd) == EXPECTED_KEYS
    assert sd["fc.weight"].shape == (128, 3 * 128)
    assert sd["layers.0.self_attn.q_proj.weight"].shape == (2 * 64, 2 * 128)
    assert sd["layers.0.self_attn.k_proj.weight"].shape == (2 * 64, 2 * 128)
    assert sd["lm_head.weight"].shape == (VOCAB, 128)
    assert sd["d2t"].dtype == torch.long and sd["t2d"].dtype == torch.bool
    assert bool(sd["t2d"].all())  # identity vocab
    assert not draft.embed_tokens.weight.requires_grad  # frozen by default


def test_ttt_mask_structure_k3():
    am = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)  # one padding key at the end
    m = [ttt_attention_mask(am, j)[0, 0].int() for j in range(3)]
    causal_valid = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    # step 0: causal over step-0 keys; the padding key is visible only to itself (no empty rows)
    assert torch.equal(m[0], causal_valid)
    # step 1: + one diagonal column (step-1 key at the same position)
    assert torch.equal(m[1], torch.cat([causal_valid, torch.ones(4, 1, dtype=torch.int)], 1))
    # step 2: + two diagonal columns (steps 1 and 2)
    assert torch.equal(m[2], torch.cat([causal_valid, torch.ones(4, 2, dtype=torch.int)], 1))
    assert m[2].shape == (4, 6)


def _dense_ttt_logits(model: Eagle3DraftModel, ids, aux, steps):
    """Reference TTT: each step attends over ALL keys of steps 0..j at all positions (a (j+1)T key set),
    with a mask built element by element from the rule: step-0 keys causal, step i>0 keys same position."""
    b, t = ids.shape
    hidden = model.fc(aux)
    pos = torch.arange(t).expand(b, t)
    ks, vs, out = [], [], []
    scaling = model.layers[0].self_attn.scaling
    for j in range(steps):
        mask = torch.zeros(t, (j + 1) * t, dtype=torch.bool)
        for q in range(t):
            for i in range(j + 1):
                for s in range(t):
                    mask[q, i * t + s] = (s <= q) if i == 0 else (s == q)

        def attend(q, k, v, mask=mask):
            ks.append(k)
            vs.append(v)
            return masked_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), mask, scaling)

        logits, hidden = model.step(shift_left(ids, j + 1), hidden, pos + j, attend)
        out.append(logits)
    return out


def test_ttt_equals_dense_reference(draft):
    ids, aux = _batch()
    with torch.no_grad():
        got = draft(ids, aux, ttt_steps=3).logits
        ref = _dense_ttt_logits(draft, ids, aux, 3)
    for j in range(3):
        torch.testing.assert_close(got[j], ref[j], rtol=1e-5, atol=1e-5)
    # the steps differ (the diagonal keys and new hidden inputs matter)
    assert (got[1] - got[0]).abs().max() > 1e-2


def test_step0_equals_plain_causal_forward(draft):
    """Step 0 recomputed independently: explicit layer math + torch SDPA(is_causal=True) + HF RoPE."""
    ids, aux = _batch()
    with torch.no_grad():
        got = draft(ids, aux, ttt_steps=1).logits[0]
        layer = draft.layers[0]
        attn = layer.self_attn
        b, t = ids.shape
        h = draft.fc(aux)
        x = torch.cat(
            [layer.input_layernorm(draft.embed_tokens(ids[:, 1:])), layer.hidden_norm(h[:, :-1])], -1
        )
        q = attn.q_proj(x).view(b, t - 1, 2, 64).transpose(1, 2)
        k = attn.k_proj(x).view(b, t - 1, 2, 64).transpose(1, 2)
        v = attn.v_proj(x).view(b, t - 1, 2, 64).transpose(1, 2)
        cos, sin = draft.rotary_emb(h, torch.arange(t - 1)[None])
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t - 1, -1)
        y = h[:, :-1] + attn.o_proj(a)
        y = y + layer.mlp(layer.post_attention_layernorm(y))
        ref = draft.lm_head(draft.norm(y))
    # the last position reads a filler token (past the end); compare the real ones
    torch.testing.assert_close(got[:, : t - 1], ref, rtol=1e-5, atol=1e-5)


def test_ttt_equals_cached_inference_chain(draft):
    """Training step j at position t == vLLM-style inference: commit pairs (token p+1, aux p) for p <= t,
    then chain steps at positions t+1, t+2 fed with the (teacher-forced) tokens and previous hidden."""
    ids, aux = _batch(b=1, t=10)
    steps = 3
    with torch.no_grad():
        ttt = draft(ids, aux, ttt_steps=steps)
        for t in (0, 3, 6):
            cache = DraftCache()
            logits, hidden = draft.extend(cache, ids[:, 1 : t + 2], aux[:, : t + 1])
            torch.testing.assert_close(logits[:, 0], ttt.logits[0][:, t], rtol=1e-5, atol=1e-5)
            chain = DraftCache()
            for j in range(1, steps):
                tok = ids[:, t + 1 + j : t + 2 + j]
                logits, hidden = draft.chain_step(cache, chain, tok, hidden, position=t + j)
                torch.testing.assert_close(logits[:, 0], ttt.logits[j][:, t], rtol=1e-5, atol=1e-5)


def test_incremental_extend_matches_one_shot(draft):
    ids, aux = _batch(b=1, t=8)
    with torch.no_grad():
        one = DraftCache()
        l1, _ = draft.extend(one, ids[:, 1:8], aux[:, :7])
        inc = DraftCache()
        draft.extend(inc, ids[:, 1:4], aux[:, :3])
        l2, _ = draft.extend(inc, ids[:, 4:8], aux[:, 3:7])
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    assert inc.length == 7
    inc.crop(5)
    assert inc.length == 5


def test_right_padding_does_not_change_valid_positions(draft):
    ids, aux = _batch(b=1, t=7)
    pad_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    pad_aux = torch.cat([aux, torch.randn(1, 3, aux.shape[-1])], 1)
    am = torch.tensor([[1] * 7 + [0] * 3], dtype=torch.bool)
    with torch.no_grad():
        a = draft(ids, aux, ttt_steps=3).logits
        b = draft(pad_ids, pad_aux, am, ttt_steps=3).logits
    for j in range(3):
        valid = 7 - 1 - j  # positions whose input token t+1+j is real
        torch.testing.assert_close(a[j][:, :valid], b[j][:, :valid], rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_steps_not_into_frozen_embeddings(draft):
    ids, aux = _batch()
    draft.train()
    out = draft(ids, aux, ttt_steps=2)
    out.logits[1].sum().backward()
    assert draft.fc.weight.grad is not None and draft.fc.weight.grad.abs().sum() > 0
    assert draft.embed_tokens.weight.grad is None


def test_config_roundtrip_and_exported_form():
    tgt = tiny_llama_config(rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    cfg = Eagle3Config.from_target_config(tgt, [1, 2, 4], 100)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling is None
    assert cfg.draft_vocab_size == 100 and cfg.target_hidden_size == 128
    cfg.extra["target_model"] = "/some/target"
    back = Eagle3Config.from_dict(cfg.to_dict())
    assert back == cfg
    # exported HF form: aux ids at the top level under vLLM's name, rope_parameters, extra keys ignored
    hf = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": VOCAB,
        "draft_vocab_size": 100,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
        "eagle_aux_hidden_state_layer_ids": [1, 2, 4],
        "torch_dtype": "float32",
    }
    c2 = Eagle3Config.from_dict(hf)
    assert c2.aux_layer_ids == [1, 2, 4] and c2.head_dim == 64 and c2.rope_theta == 5e5
    assert set(Eagle3DraftModel(c2).state_dict()) == EXPECTED_KEYS


def test_llama3_rope_scaling_is_carried():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    tgt = tiny_llama_config(rope_parameters={**scaling, "rope_theta": 5e5})
    cfg = Eagle3Config.from_target_config(tgt, [1, 2, 3])
    assert cfg.rope_scaling == scaling
    d = Eagle3DraftModel(cfg)
    assert d.rotary_emb.rope_type == "llama3"


def test_draft_vocab_mapping():
    d = tiny_draft(draft_vocab_size=50)

    class V:  # stand-in with the DraftVocab fields
        d2t = torch.arange(50) * 2 - torch.arange(50)  # draft i -> target 2i
        t2d = torch.zeros(VOCAB, dtype=torch.bool).index_fill_(0, torch.arange(50) * 2, True)

    d.set_vocab(V)
    assert torch.equal(d.draft_to_target(torch.tensor([0, 1, 49])), torch.tensor([0, 2, 98]))
    assert int(d.t2d.sum()) == 50


def test_gqa_ttt_matches_dense_and_inference():
    """Grouped-query attention (4 query heads over 2 KV heads) through both attention paths."""
    d = tiny_draft(seed=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    assert d.state_dict()["layers.0.self_attn.k_proj.weight"].shape == (2 * 32, 256)
    ids, aux = _batch(b=1, t=8)
    with torch.no_grad():
        got = d(ids, aux, ttt_steps=3).logits
        ref = _dense_ttt_logits(d, ids, aux, 3)
        for j in range(3):
            torch.testing.assert_close(got[j], ref[j], rtol=1e-5, atol=1e-5)
        t = 4
        cache, chain = DraftCache(), DraftCache()
        logits, hidden = d.extend(cache, ids[:, 1 : t + 2], aux[:, : t + 1])
        for j in range(1, 3):
            logits, hidden = d.chain_step(cache, chain, ids[:, t + 1 + j : t + 2 + j], hidden, position=t + j)
            torch.testing.assert_close(logits[:, 0], got[j][:, t], rtol=1e-5, atol=1e-5)


def test_bf16_autocast_loss_is_finite():
    d = tiny_draft()
    ids, aux = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(ids, aux, ttt_steps=2)
    assert all(torch.isfinite(lg.float()).all() for lg in out.logits)
