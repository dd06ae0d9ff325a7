"""Memory-linear TTT attention (drafters/eagle3/ttt_attention.py) == the dense brute-force reference, outputs and
gradients, for every backend; and the whole head's loss gradients agree between backends."""

from __future__ import annotations

import pytest
import torch

from modelopt_ext.drafters.eagle3.ttt_attention import (
    is_right_padded,
    resolve_impl,
    ttt_attention,
    ttt_attention_dense,
    ttt_attention_mask,
)
from tests.model.conftest import VOCAB, tiny_draft


def _brute_force(q, keys, values, attention_mask, scale):
    """Element by element from the rule: step-0 key s visible to query t iff s <= t and (s is real or
    s == t); the step-i key (i >= 1) only at the query's own position. Softmax over all visible keys."""
    b, h, t, _ = q.shape
    groups = h // keys[0].shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            kv = hi // groups
            for ti in range(t):
                ks = [keys[0][bi, kv, s] for s in range(ti + 1) if attention_mask[bi, s] or s == ti]
                vs = [values[0][bi, kv, s] for s in range(ti + 1) if attention_mask[bi, s] or s == ti]
                ks += [k[bi, kv, ti] for k in keys[1:]]
                vs += [v[bi, kv, ti] for v in values[1:]]
                scores = torch.stack([(q[bi, hi, ti] * k).sum() * scale for k in ks])
                p = torch.softmax(scores, 0)
                out[bi, hi, ti] = (p[:, None] * torch.stack(vs)).sum(0)
    return out


def _inputs(steps, b=2, h=4, kv=2, t=13, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, requires_grad=True)
    keys = [torch.randn(b, kv, t, d, generator=g, requires_grad=True) for _ in range(steps)]
    values = [torch.randn(b, kv, t, d, generator=g, requires_grad=True) for _ in range(steps)]
    return q, keys, values


def _out_and_grads(fn, q, keys, values, valid):
    out = fn(q, keys, values)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))  # fixed, layout-independent
    tensors = [q, *keys, *values]
    grads = torch.autograd.grad((out * w * valid).sum(), tensors)
    return out * valid, grads


@pytest.mark.parametrize("impl", ["chunked", "fused", "dense"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_matches_brute_force_with_gradients(impl, steps):
    q, keys, values = _inputs(steps)
    am = torch.ones(2, 13, dtype=torch.bool)
    am[1, 9:] = False  # right padding in the second row
    valid = am[:, None, :, None]  # padding query rows may differ (never read); real ones must not
    scale = 8**-0.5
    ref_out, ref_grads = _out_and_grads(
        lambda q, k, v: _brute_force(q, k, v, am, scale), q, keys, values, valid
    )
    # chunk 4 < T: several chunks, the last one partial
    got_out, got_grads = _out_and_grads(
        lambda q, k, v: ttt_attention(q, k, v, am, scale, impl, chunk=4), q, keys, values, valid
    )
    torch.testing.assert_close(got_out, ref_out, rtol=1e-5, atol=1e-5)
    for got, ref in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert all(g.abs().max() > 0 for g in got_grads)  # every input receives a gradient


def test_chunked_masks_padding_keys_everywhere_like_dense():
    """Left padding (not right): only the chunked backend applies, and it equals the dense form at every
    position, padding rows included."""
    q, keys, values = _inputs(3, b=1)
    am = torch.tensor([[0, 0, 0] + [1] * 10], dtype=torch.bool)
    assert not is_right_padded(am)
    dense = ttt_attention_dense(q, keys, values, ttt_attention_mask(am, 2), 0.3)
    got = ttt_attention(q, keys, values, am, 0.3, "auto", chunk=5)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fused TTT attention needs right padding"):
        ttt_attention(q, keys, values, am, 0.3, "fused")
    with pytest.raises(ValueError, match="attention implementation 'flash'"):
        resolve_impl("flash", q, True)


def test_bf16_fused_and_chunked_agree_with_fp32_reference():
    q, keys, values = _inputs(3, t=33, d=16)
    am = torch.ones(2, 33, dtype=torch.bool)
    ref = ttt_attention(q, keys, values, am, 0.25, "dense")
    for impl in ("fused", "chunked"):
        got = ttt_attention(
            q.bfloat16(), [k.bfloat16() for k in keys], [v.bfloat16() for v in values], am, 0.25, impl
        )
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


def test_head_loss_gradients_equal_across_backends():
    """The whole draft head, 3 TTT steps, right-padded batch: parameter gradients of one loss are the
    same (float tolerance) whichever backend computes the attention."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    aux = torch.randn(2, 11, 3 * 128, generator=g)
    am = torch.ones(2, 11, dtype=torch.bool)
    am[0, 7:] = False
    grads = {}
    for impl in ("dense", "chunked", "fused"):
        d = tiny_draft(seed=5)
        d.attention_impl = impl
        out = d(ids, aux, am, ttt_steps=3)
        loss = sum((lg[am] ** 2).mean() for lg in out.logits)
        loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    assert set(grads["dense"]) == set(grads["fused"]) and len(grads["dense"]) > 5
    for impl in ("chunked", "fused"):
        for name, ref in grads["dense"].items():
            torch.testing.assert_close(grads[impl][name], ref, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_probe_accepts_a_working_backend():
    """The once-per-GPU probe (the guard in front of the private CUDA flash ops) on CPU, where both run."""
    from modelopt_ext.drafters.eagle3.ttt_attention import probe_fused

    assert probe_fused(torch.device("cpu"), torch.float32, 16)
    assert probe_fused(torch.device("cpu"), torch.bfloat16, 64)
