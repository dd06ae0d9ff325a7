"""Training-time-test (TTT) attention in memory linear in the sequence length.

The step-j query at position t attends to the step-0 keys at positions s <= t (causal) and to the keys of
steps 1..j at the same position t (the "diagonal" keys; drafters/eagle3/modeling.py explains why). The dense form
(`ttt_attention_dense`) builds fp32 scores [B, heads, T, T + j] per step and autograd keeps them (and the
softmax) for backward: quadratic memory, the reason long contexts run out of memory in EAGLE-3 trainers.

Here the two parts are computed apart and merged by log-sum-exp, inside one autograd Function that saves
only q, the keys/values, the merged output and its log-sum-exp L ([B, heads, T]):

    block 0:   (o0, lse0) = causal attention over the step-0 keys        (fused kernel or query chunks)
    diagonal:  s_i = scale * <q_t, k_i,t>                               ([B, heads, T] per step i)
    merge:     L = logsumexp(lse0, s_1..s_j);  out = exp(lse0 - L) o0 + sum_i exp(s_i - L) v_i

The backward is flash attention's: with D = rowsum(dout * out), the block-0 probabilities are
exp(S0 - L) (recomputed, never stored) and dS = P * (dout V^T - D). A fused flash backward given the
MERGED out and L computes exactly the block-0 share of the merged attention's gradient, so the kernels of
`scaled_dot_product_attention` can be used unchanged; the diagonal terms' gradients are row-wise.

Block-0 backends:
    "fused":   torch's flash-attention kernels (CPU: `_scaled_dot_product_flash_attention_for_cpu`; CUDA:
               `_scaled_dot_product_flash_attention`, bf16/fp16). Causal only: padding keys are not masked,
               which changes nothing at real positions when padding is on the right (a real query never
               sees a later key); `ttt_attention` checks that and otherwise uses "chunked".
    "chunked": plain torch, query chunks of `chunk` rows: scores [B, heads, chunk, T] live one chunk at a
               time, in the forward and again in the backward. Any device and dtype; masks padding keys
               exactly as the dense form does (a query always keeps its own position).
    "dense":   `ttt_attention_dense`, the quadratic reference (tests, the memory benchmark's "before").
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
from transformers.models.llama.modeling_llama import repeat_kv

Impl = Literal["auto", "fused", "chunked", "dense"]
IMPLS: tuple[str, ...] = ("auto", "fused", "chunked", "dense")

log = logging.getLogger(__name__)

# Bytes of fp32 scores one chunk may hold (the chunked backend's transient, per chunk).
_CHUNK_BYTES = 64 << 20


def ttt_attention_mask(attention_mask: torch.Tensor, step: int) -> torch.Tensor:
    """Boolean mask [B, 1, T, T + step] for TTT step `step` (True = may attend); the dense form's mask.

    Columns 0..T-1 are the step-0 keys at positions 0..T-1: causal, and padding keys are masked (a
    query always keeps its own position so no row is empty). Column T + i - 1 (i = 1..step) is the key
    of step i at the query's own position: always visible.
    """
    b, t = attention_mask.shape
    dev = attention_mask.device
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    eye = torch.eye(t, dtype=torch.bool, device=dev)
    base = causal & (attention_mask.bool()[:, None, None, :] | eye)
    extra = torch.ones(b, 1, t, step, dtype=torch.bool, device=dev)
    return torch.cat([base, extra], dim=-1)


def ttt_attention_dense(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    mask: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The quadratic reference: fp32 scores [B, nh, T, T + j] against step-0 keys plus one column per
    diagonal key, mask from `ttt_attention_mask`. query [B, nh, T, d]; keys/values [B, nkv, T, d] per step."""
    groups = query.shape[1] // keys[0].shape[1]
    k0, v0 = repeat_kv(keys[0], groups), repeat_kv(values[0], groups)
    scores = [torch.matmul(query, k0.transpose(2, 3)) * scaling]
    for k in keys[1:]:
        scores.append((query * repeat_kv(k, groups)).sum(-1, keepdim=True) * scaling)
    s = torch.cat(scores, dim=-1).float().masked_fill(~mask, torch.finfo(torch.float32).min)
    p = torch.softmax(s, dim=-1).to(query.dtype)
    t = k0.shape[2]
    out = torch.matmul(p[..., :t], v0)
    for i, v in enumerate(values[1:]):
        out = out + p[..., t + i : t + i + 1] * repeat_kv(v, groups)
    return out


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is real tokens then padding (no real token after a padding one)."""
    am = attention_mask.bool()
    return bool((am[:, 1:] <= am[:, :-1]).all()) if am.shape[1] > 1 else True


def fused_supported(query: torch.Tensor) -> bool:
    """Whether the fused block-0 kernels take this query (device, dtype, head size)."""
    d = query.shape[-1]
    if query.device.type == "cpu":
        return query.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if query.device.type == "cuda":
        ok_shape = query.dtype in (torch.bfloat16, torch.float16) and d % 8 == 0 and d <= 256
        return ok_shape and _cuda_fused_works(query.device.index or 0, query.dtype, d)
    return False


@functools.cache
def _cuda_fused_works(index: int, dtype: torch.dtype, head_dim: int) -> bool:
    """Probe once per (GPU, dtype, head size): the private flash ops run and agree with the chunked
    backend, forward and backward. A build whose ops differ falls back to "chunked" with a warning
    instead of failing a training run."""
    dev = torch.device("cuda", index)
    try:
        with torch.enable_grad(), torch.autocast("cuda", enabled=False):
            return probe_fused(dev, dtype, head_dim)
    except Exception as e:  # noqa: BLE001 - any failure of the private ops means: do not use them
        log.warning("fused TTT attention unavailable on %s (%s): using chunked", dev, e)
    return False


def probe_fused(dev: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the fused backend agrees with the chunked one (outputs and gradients) on `dev`."""
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (1, 2, 48, head_dim)
    x = [torch.randn(*shape, device=dev, generator=g).to(dtype).requires_grad_() for _ in range(5)]
    q, kv = x[0], x[1:]
    outs = []
    for backend in ("fused", "chunked"):
        out = _TTTAttention.apply(q, None, backend, head_dim**-0.5, 16, *kv)
        grads = torch.autograd.grad(out.float().square().sum(), x)
        outs.append([out.float(), *[t.float() for t in grads]])
    err = max((a - b).abs().max().item() for a, b in zip(*outs, strict=True))
    scale = max(b.abs().max().item() for b in outs[1])
    if err <= 5e-2 * max(1.0, scale):
        return True
    log.warning("fused TTT attention disagrees with the chunked one on %s (%.3g): using chunked", dev, err)
    return False


def resolve_impl(impl: str, query: torch.Tensor, right_padded: bool) -> str:
    """The backend `ttt_attention` uses: "auto" -> "fused" where supported and padding is on the right,
    else "chunked". An explicit "fused" that cannot run is an error (never a silent change of backend)."""
    if impl not in IMPLS:
        raise ValueError(f"attention implementation {impl!r}: expected one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "fused" if right_padded and fused_supported(query) else "chunked"
    if impl == "fused" and not (right_padded and fused_supported(query)):
        raise ValueError(
            f"fused TTT attention needs right padding and a supported query ({query.device.type}, "
            f"{query.dtype}, head_dim {query.shape[-1]}); use 'auto' or 'chunked'"
        )
    return impl


def ttt_attention(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    attention_mask: torch.Tensor,
    scaling: float,
    impl: str = "auto",
    right_padded: bool | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """TTT attention of the step-j query (j = len(keys) - 1), memory linear in T (module docstring).

    query [B, nh, T, d]; keys/values: one [B, nkv, T, d] per step 0..j; attention_mask bool [B, T] (False on
    padding). `right_padded` (computed when None) lets a caller check the mask once for all steps.
    """
    if right_padded is None:
        right_padded = is_right_padded(attention_mask)
    if impl == "dense":
        mask = ttt_attention_mask(attention_mask, len(keys) - 1)
        return ttt_attention_dense(query, keys, values, mask, scaling)
    # One compute dtype for the kernels: autocast's where active (q after RoPE may be fp32, v bf16).
    dev = query.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else query.dtype
    groups = query.shape[1] // keys[0].shape[1]
    kv = [repeat_kv(x, groups).to(dtype) for pair in zip(keys, values, strict=True) for x in pair]
    q = query.to(dtype)
    backend = resolve_impl(impl, q, right_padded)
    key_valid = None if backend == "fused" else attention_mask.bool()
    b, h, t, _ = q.shape
    if chunk is None:
        chunk = max(16, min(t, _CHUNK_BYTES // max(1, 4 * b * h * t)))
    with torch.autocast(dev, enabled=False):
        return _TTTAttention.apply(q, key_valid, backend, float(scaling), int(chunk), *kv)


class _TTTAttention(torch.autograd.Function):
    """Block 0 (backend) + diagonal terms merged by log-sum-exp; saves nothing quadratic."""

    @staticmethod
    def forward(ctx, q, key_valid, backend, scale, chunk, *kv):
        k0, v0 = kv[0], kv[1]
        diag_k, diag_v = kv[2::2], kv[3::2]
        if backend == "fused":
            o0, lse0, extra = _fused_forward(q, k0, v0, scale)
        else:
            o0, lse0 = _chunked_forward(q, k0, v0, key_valid, scale, chunk)
            extra = None
        scores = [lse0] + [(q * k).sum(-1).float() * scale for k in diag_k]
        lse = torch.logsumexp(torch.stack(scores), dim=0)
        out = torch.exp(lse0 - lse).unsqueeze(-1) * o0.float()
        for s, v in zip(scores[1:], diag_v, strict=True):
            out = out + torch.exp(s - lse).unsqueeze(-1) * v.float()
        out = out.to(q.dtype)
        ctx.backend, ctx.scale, ctx.chunk, ctx.extra = backend, scale, chunk, extra
        ctx.save_for_backward(q, key_valid, out, lse, *kv)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, key_valid, out, lse, *kv = ctx.saved_tensors
        k0, v0 = kv[0], kv[1]
        diag_k, diag_v = kv[2::2], kv[3::2]
        scale = ctx.scale
        dout = dout.contiguous().to(q.dtype)
        delta = (dout.float() * out.float()).sum(-1)  # D = rowsum(dout * out), [B, nh, T]
        if ctx.backend == "fused":
            dq, dk0, dv0 = _fused_backward(dout, q, k0, v0, out, lse, scale, ctx.extra)
            dq = dq.float()
        else:
            dq, dk0, dv0 = _chunked_backward(dout, q, k0, v0, key_valid, lse, delta, scale, ctx.chunk)
        grads = [dk0.to(k0.dtype), dv0.to(v0.dtype)]
        qf, doutf = q.float(), dout.float()
        for k, v in zip(diag_k, diag_v, strict=True):
            p = torch.exp((q * k).sum(-1).float() * scale - lse)  # [B, nh, T]
            ds = p * ((doutf * v.float()).sum(-1) - delta) * scale
            dq = dq + ds.unsqueeze(-1) * k.float()
            grads += [(ds.unsqueeze(-1) * qf).to(k.dtype), (p.unsqueeze(-1) * doutf).to(v.dtype)]
        return (dq.to(q.dtype), None, None, None, None, *grads)


def _chunk_mask(a: int, b: int, key_valid: torch.Tensor | None, device) -> torch.Tensor:
    """[B or 1, 1, b - a, b] bool: causal rows a..b-1 over keys 0..b-1; padding keys hidden except own."""
    rows = torch.arange(a, b, device=device)[:, None]
    cols = torch.arange(b, device=device)[None, :]
    causal = cols <= rows
    if key_valid is None:
        return causal[None, None]
    return causal & (key_valid[:, None, None, :b] | (cols == rows))


def _chunked_forward(q, k, v, key_valid, scale, chunk):
    """(o0 [B, nh, T, d] in q's dtype, lse0 fp32 [B, nh, T]) of causal attention, chunk rows at a time."""
    b, h, t, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, t, dtype=torch.float32, device=q.device)
    for a in range(0, t, chunk):
        e = min(t, a + chunk)
        s = torch.matmul(q[:, :, a:e], k[:, :, :e].transpose(2, 3)).float() * scale
        s = s.masked_fill(~_chunk_mask(a, e, key_valid, q.device), float("-inf"))
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        lse[:, :, a:e] = (m + torch.log(denom)).squeeze(-1)
        out[:, :, a:e] = torch.matmul((p / denom).to(v.dtype), v[:, :, :e])
    return out, lse


def _chunked_backward(dout, q, k, v, key_valid, lse, delta, scale, chunk):
    """Block-0 gradients (dq fp32, dk, dv fp32) from the merged lse and delta, recomputing scores per chunk."""
    t = q.shape[2]
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for a in range(0, t, chunk):
        e = min(t, a + chunk)
        qc, dc = q[:, :, a:e], dout[:, :, a:e]
        s = torch.matmul(qc, k[:, :, :e].transpose(2, 3)).float() * scale
        s = s.masked_fill(~_chunk_mask(a, e, key_valid, q.device), float("-inf"))
        p = torch.exp(s - lse[:, :, a:e, None])
        dp = torch.matmul(dc, v[:, :, :e].transpose(2, 3)).float()
        ds = (p * (dp - delta[:, :, a:e, None]) * scale).to(q.dtype)
        dq[:, :, a:e] = torch.matmul(ds, k[:, :, :e])
        dk[:, :, :e] += torch.matmul(ds.transpose(2, 3), qc)
        dv[:, :, :e] += torch.matmul(p.to(q.dtype).transpose(2, 3), dc)
    return dq, dk, dv


def _fused_forward(q, k, v, scale):
    """Causal flash attention with its log-sum-exp: (o0, lse0 fp32 [B, nh, T], state for the backward)."""
    if q.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return o, lse.float(), None
    r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    o, lse, cum_q, cum_k, max_q, max_k, seed, offset = r[:8]
    return o, lse.float(), (cum_q, cum_k, max_q, max_k, seed, offset)


def _fused_backward(dout, q, k, v, out, lse, scale, extra):
    """Flash backward given the MERGED out and lse: the block-0 share of the merged gradient."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, True, scale=scale
        )
    cum_q, cum_k, max_q, max_k, seed, offset = extra
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale
    )[:3]
