"""The DFlash block-diffusion drafter, built from transformers' Qwen3 building blocks, readable top to bottom.

What it computes (the model of z-lab/dflash `dflash/model.py`, which vLLM's `DFlashDraftModel` and SGLang's
DFlash model load):

    ctx    = hidden_norm(fc(concat(target states of the captured layers)))     # [.., n*H_t] -> [.., H]
    x      = embed(block)      block = [anchor token, MASK x (B-1)]             # the TARGET's embeddings
    for each draft layer (Qwen3 decoder layer with KV injection):
        h       = input_layernorm(x)
        Q       = rope(q_norm(q_proj(h)))                                      # from the block only
        K, V    = concat(rope(k_norm(k_proj(ctx))), rope(k_norm(k_proj(h)))),  # context, then block
                  concat(v_proj(ctx), v_proj(h))
        x       = x + o_proj(attention(Q, K, V))    # block queries see the context strictly before the
        x       = x + mlp(post_attention_layernorm(x))  #   anchor and the whole block (non-causal)
    logits = lm_head(norm(x))[1:]                                               # the TARGET's lm_head

Block position k (0 = the anchor, the last verified token at position a) sits at RoPE position a + k and
predicts the token at a + k; the context holds the target's states at positions 0..a-1 (the target has not
read the anchor yet at inference). The context never passes through input_layernorm (only hidden_norm, once
per forward), exactly as vLLM's `precompute_and_store_context_kv` does; every layer projects the SAME
`ctx` with its own k_proj/v_proj.

Weights (state_dict keys == the names vLLM's `qwen3_dflash.py` loads, so export is near-identity):
    fc.weight, hidden_norm.weight, norm.weight,
    layers.{i}.self_attn.{q,k,v,o}_proj.weight, layers.{i}.self_attn.{q,k}_norm.weight,
    layers.{i}.mlp.{gate,up,down}_proj.weight, layers.{i}.{input,post_attention}_layernorm.weight
The target's embeddings and lm_head are NOT the draft's: they are frozen, non-persistent buffers
(`target_embed`, `target_lm_head`) installed from the target (`set_target_tensors`), shared with it rather
than copied, and absent from checkpoints and exports (the engines use the target's own). The mask token's
embedding is the target's embedding row `mask_token_id` (no separate `mask_embedding`).

Checkpoint config (`DFlashConfig.to_dict()`, written as config.json by the trainer; the exporter relies on it):
    drafter: "dflash"
    hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim, num_hidden_layers
        (draft layers), rms_norm_eps, rope_theta, rope_scaling (None or the non-default RoPE parameters),
        max_position_embeddings, vocab_size, hidden_act             -- the draft's Qwen3 config fields
    block_size       B: tokens per block (anchor + B-1 masks); vLLM num_speculative_tokens = B-1
    mask_token_id    id fed at the masked block positions (inside [0, vocab_size))
    target_layer_ids DFlash numbering (z-lab, vLLM's `dflash_config.target_layer_ids`): 0-based decoder-layer
                     OUTPUTS, i.e. our vLLM-numbered aux id minus 1. Write it into dflash_config verbatim.
    target_hidden_size, num_target_layers
    causal           false (blocks are bidirectional; written explicitly so engines do not guess)

Attention: PyTorch SDPA with a boolean mask, chunked over blocks (`BLOCKS_PER_CHUNK` blocks per call). A
chunk of c blocks attends over [context (T) | its own c*B block keys] with mask [c*B, T + c*B]: a block sees
context keys < its anchor and its own block. Blocks of other chunks are invisible, so they are not even
concatenated. On GPU SDPA runs its memory-efficient kernel with that mask (no score tensor kept for
backward); on CPU the fused CPU flash kernel; the largest transient is the chunk's mask and, on the math
fallback, one chunk's scores (heads x c*B x (T + c*B)), never the [N*B, T + N*B] fp32 scores of all
blocks at once. flex_attention would skip the masked tiles outright on GPU, but needs torch.compile to be
fast and is not available on every build; SDPA works everywhere, and the chunking bounds its memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
)

from modelopt_ext.drafters.rope import rope_from_dict

# Blocks per SDPA call in training (see the module docstring); 64 blocks of 16 = 1024 queries per call.
BLOCKS_PER_CHUNK = 64


@dataclass
class DFlashConfig:
    """Shape of the draft (see the module docstring for the JSON form)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    target_layer_ids: list[int]  # DFlash numbering (0-based layer outputs) = vLLM id - 1
    block_size: int = 16
    mask_token_id: int = 0
    num_hidden_layers: int = 5
    target_hidden_size: int | None = None
    num_target_layers: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    causal: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size
        if not self.target_layer_ids:
            raise ValueError("DFlashConfig.target_layer_ids must list at least one target layer")
        if self.block_size < 2:
            raise ValueError(f"block_size {self.block_size}: must be >= 2 (the anchor and at least one draft)")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} outside the vocabulary [0, {self.vocab_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def aux_layer_ids(self) -> list[int]:
        """The captured target layers in vLLM's (and this project's) numbering."""
        return [i + 1 for i in self.target_layer_ids]

    @classmethod
    def from_target_config(
        cls,
        hf_config: Any,
        aux_layer_ids: list[int],
        *,
        num_layers: int = 5,
        block_size: int = 16,
        mask_token_id: int | None = None,
    ) -> DFlashConfig:
        """A draft as wide as the target (it shares the target's embeddings and lm_head), with the target's
        heads, MLP width and RoPE. `aux_layer_ids` in vLLM numbering (already validated by targets/layers.py)."""
        if hasattr(hf_config, "get_text_config"):
            hf_config = hf_config.get_text_config()
        g = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        hidden, heads = int(g["hidden_size"]), int(g["num_attention_heads"])
        vocab = int(g["vocab_size"])
        theta, scaling = rope_from_dict(g)
        return cls(
            hidden_size=hidden,
            intermediate_size=int(g["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(g.get("num_key_value_heads") or heads),
            head_dim=int(g.get("head_dim") or hidden // heads),
            vocab_size=vocab,
            target_layer_ids=[int(i) - 1 for i in aux_layer_ids],
            block_size=block_size,
            mask_token_id=int(g["vocab_size"]) - 1 if mask_token_id is None else int(mask_token_id),
            num_hidden_layers=num_layers,
            target_hidden_size=hidden,
            num_target_layers=int(g["num_hidden_layers"]),
            rms_norm_eps=float(g.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(g.get("max_position_embeddings", 32768)),
            hidden_act=str(g.get("hidden_act", "silu")),
        )

    def to_dict(self) -> dict:
        """JSON-ready (the checkpoint's config.json, with `drafter` added by the plugin)."""
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_dict(cls, d: dict) -> DFlashConfig:
        """Our `to_dict()` output, or an exported folder's config (`dflash_config` holding block_size,
        mask_token_id, target_layer_ids; transformers 4 or 5 RoPE fields)."""
        d = dict(d)
        nested = d.get("dflash_config") if isinstance(d.get("dflash_config"), dict) else {}
        for k in ("target_layer_ids", "mask_token_id", "block_size", "causal"):
            if d.get(k) is None and nested.get(k) is not None:
                d[k] = nested[k]
        if not d.get("target_layer_ids"):
            raise ValueError("drafter config has no target_layer_ids (top level or dflash_config)")
        if d.get("mask_token_id") is None:
            raise ValueError("drafter config has no mask_token_id (top level or dflash_config)")
        theta, scaling = rope_from_dict(d)
        special = {"extra", "rope_theta", "rope_scaling", "target_layer_ids"}
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k not in special and d.get(k) is not None}
        kw.setdefault("head_dim", int(d["hidden_size"]) // int(d["num_attention_heads"]))
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        return cls(target_layer_ids=[int(i) for i in d["target_layer_ids"]], rope_theta=theta,
                   rope_scaling=scaling, **kw)  # fmt: skip

    def qwen3_config(self) -> Qwen3Config:
        """A Qwen3Config for the transformers building blocks (MLP, RMSNorm, RoPE)."""
        params = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        return Qwen3Config(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            num_hidden_layers=self.num_hidden_layers,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=params,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
        )


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------


class DFlashAttention(nn.Module):
    """Qwen3 attention with KV injection: K/V over [context ; block], Q over the block. No bias."""

    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def keys_values(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]):
        """x [B, n, H] -> (K [B, nkv, n, d] normed and rotated, V [B, nkv, n, d])."""
        b, n, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos_sin
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        return k, v

    def queries(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        cos, sin = cos_sin
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        return q

    def forward(self, x, cos_sin, context_kv, attend) -> torch.Tensor:
        """x [B, q, H] (block, after input_layernorm); context_kv = (K, V) of the context for this layer;
        attend(q, k_ctx, v_ctx, k_blk, v_blk) -> [B, nh, q, d] owns the mask."""
        q = self.queries(x, cos_sin)
        k, v = self.keys_values(x, cos_sin)
        out = attend(q, context_kv[0], context_kv[1], k, v)
        b, _, n, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class DFlashDecoderLayer(nn.Module):
    """One draft layer (vLLM `DFlashQwen3DecoderLayer`): pre-norm attention with KV injection, pre-norm MLP."""

    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.self_attn = DFlashAttention(config)
        self.mlp = Qwen3MLP(config.qwen3_config())
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos_sin, context_kv, attend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, context_kv, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------------
# Attention over [context | blocks]: the block mask
# ----------------------------------------------------------------------------------------------------


def block_mask(anchors: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    """Boolean mask [B, 1, n*Bs, T + n*Bs] for n blocks (anchors [B, n]) over [context (T) | the n blocks]:
    block i sees context keys at positions < anchors[:, i] and its own Bs keys (bidirectionally)."""
    n = anchors.shape[1]
    q_block = torch.arange(n * block_size, device=anchors.device) // block_size  # [q]
    kv = torch.arange(context_len + n * block_size, device=anchors.device)  # [k]
    anchor_q = anchors[:, q_block]  # [B, q]
    sees_ctx = (kv[None, None, :] < context_len) & (kv[None, None, :] < anchor_q[:, :, None])
    kv_block = (kv - context_len).div(block_size, rounding_mode="floor")
    sees_blk = (kv[None, :] >= context_len) & (kv_block[None, :] == q_block[:, None])
    return (sees_ctx | sees_blk[None]).unsqueeze(1)


def _sdpa(q, k, v, mask, scaling):
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


def blocks_attention(q, k_ctx, v_ctx, k_blk, v_blk, anchors, block_size, scaling, chunk=BLOCKS_PER_CHUNK):
    """Training attention: queries of n blocks [B, nh, n*Bs, d] over the context keys [B, nkv, T, d] and the
    block keys [B, nkv, n*Bs, d], under `block_mask`, `chunk` blocks per SDPA call (module docstring)."""
    t = k_ctx.shape[2]
    n = anchors.shape[1]
    outs = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        qs, qe = s * block_size, e * block_size
        k = torch.cat([k_ctx, k_blk[:, :, qs:qe]], dim=2)
        v = torch.cat([v_ctx, v_blk[:, :, qs:qe]], dim=2)
        mask = block_mask(anchors[:, s:e], t, block_size)
        outs.append(_sdpa(q[:, :, qs:qe], k, v, mask, scaling))
    return torch.cat(outs, dim=2)


# ----------------------------------------------------------------------------------------------------
# The draft model
# ----------------------------------------------------------------------------------------------------


class DFlashDraftModel(nn.Module):
    """The DFlash drafter. state_dict keys: see the module docstring (exactly what vLLM loads)."""

    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(len(config.target_layer_ids) * config.target_hidden_size, h, bias=False)
        self.hidden_norm = Qwen3RMSNorm(h, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList([DFlashDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = Qwen3RMSNorm(h, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config.qwen3_config())  # non-persistent buffers only
        # The target's tensors, shared and frozen (not in checkpoints/exports); see set_target_tensors.
        self.register_buffer("target_embed", torch.empty(0), persistent=False)
        self.register_buffer("target_lm_head", torch.empty(0), persistent=False)

    # --- setup -------------------------------------------------------------------------------------

    @torch.no_grad()
    def set_target_tensors(self, embeddings: torch.Tensor | None = None, lm_head: torch.Tensor | None = None):
        """Install the target's input embeddings [V, H] and lm_head weight [V, H] (shared, frozen)."""
        want = (self.config.vocab_size, self.config.hidden_size)
        for name, t in (("target_embed", embeddings), ("target_lm_head", lm_head)):
            if t is None:
                continue
            if tuple(t.shape) != want:
                raise ValueError(f"target {name[7:]} has shape {tuple(t.shape)}, the draft needs {want}")
            setattr(self, name, t.detach())

    def _need_target(self) -> None:
        if self.target_embed.numel() == 0 or self.target_lm_head.numel() == 0:
            raise RuntimeError(
                "DFlash draft: the target's embeddings and lm_head are not installed (set_target_tensors)"
            )

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.target_embed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Post-norm draft hidden [.., H] -> logits over the target vocabulary (in the head's dtype: the small
        hidden tensor is cast, never the [V, H] head)."""
        w = self.target_lm_head
        return F.linear(hidden.to(w.dtype), w)

    def context(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """Target states [B, T, n*H_t] -> the injected context features [B, T, H]."""
        return self.hidden_norm(self.fc(aux_hidden_states.to(self.fc.weight.dtype)))

    def _run_layers(self, block_ids, positions, ctx_kv_per_layer, attend) -> torch.Tensor:
        x = self.embed(block_ids).to(self.fc.weight.dtype)
        cos_sin = self.rotary_emb(x, positions)
        for layer, ctx_kv in zip(self.layers, ctx_kv_per_layer, strict=True):
            x = layer(x, cos_sin, ctx_kv, attend)
        return self.norm(x)

    def _context_kv(self, ctx: torch.Tensor, positions: torch.Tensor):
        """Per layer (K, V) of the context features ctx [B, T, H] at RoPE `positions` [B, T]."""
        cos_sin = self.rotary_emb(ctx, positions)
        return [layer.self_attn.keys_values(ctx, cos_sin) for layer in self.layers]

    # --- training: all blocks of a batch in one forward ------------------------------------------------

    def block_ids(self, input_ids: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """[B, n*Bs] block inputs: the anchor token then mask_token_id x (Bs-1), per anchor."""
        bs = self.config.block_size
        b, n = anchors.shape
        ids = torch.full((b, n, bs), self.config.mask_token_id, dtype=torch.long, device=input_ids.device)
        ids[:, :, 0] = torch.gather(input_ids, 1, anchors)
        return ids.view(b, n * bs)

    def forward(self, input_ids: torch.Tensor, aux_hidden_states: torch.Tensor, anchors: torch.Tensor):
        """Post-norm hidden states [B, n*Bs, H] of every block (anchors [B, n], positions into the sequence).

        input_ids [B, T] and aux_hidden_states [B, T, n_aux*H_t] aligned as in `Supervision`. Block i's
        position k sits at RoPE position anchors[:, i] + k and sees context positions < anchors[:, i].
        """
        self._need_target()
        b, t = input_ids.shape
        bs = self.config.block_size
        ctx = self.context(aux_hidden_states)
        ctx_pos = torch.arange(t, device=input_ids.device).expand(b, t)
        ctx_kv = self._context_kv(ctx, ctx_pos)
        blk_pos = (anchors[:, :, None] + torch.arange(bs, device=anchors.device)).view(b, -1)
        scaling = self.layers[0].self_attn.scaling

        def attend(q, k_ctx, v_ctx, k_blk, v_blk):
            return blocks_attention(q, k_ctx, v_ctx, k_blk, v_blk, anchors, bs, scaling)

        return self._run_layers(self.block_ids(input_ids, anchors), blk_pos, ctx_kv, attend)

    # --- inference: cached context, one forward per block ---------------------------------------------

    def new_cache(self) -> DFlashCache:
        return DFlashCache(num_layers=len(self.layers))

    def extend(self, cache: DFlashCache, aux_hidden_states: torch.Tensor) -> None:
        """Commit target states of the next context positions (cache.length ...): [B, n, n_aux*H_t]."""
        b, n, _ = aux_hidden_states.shape
        start = cache.length
        pos = torch.arange(start, start + n, device=aux_hidden_states.device).expand(b, n)
        cache.append(self._context_kv(self.context(aux_hidden_states), pos))

    def draft_block(self, cache: DFlashCache, anchor: torch.Tensor, position: int) -> torch.Tensor:
        """One forward: the block [anchor, MASK x (Bs-1)] at RoPE positions position..position+Bs-1 over the
        whole cached context; returns logits [B, Bs-1, V] for the tokens after the anchor.
        anchor [B, 1] is the last verified token at `position` (= cache.length: the target has not read it)."""
        self._need_target()
        bs = self.config.block_size
        b = anchor.shape[0]
        ids = torch.full((b, bs), self.config.mask_token_id, dtype=torch.long, device=anchor.device)
        ids[:, :1] = anchor
        pos = torch.arange(position, position + bs, device=anchor.device).expand(b, bs)
        scaling = self.layers[0].self_attn.scaling

        def attend(q, k_ctx, v_ctx, k_blk, v_blk):
            if k_ctx is None:
                return _sdpa(q, k_blk, v_blk, None, scaling)
            return _sdpa(q, torch.cat([k_ctx, k_blk], 2), torch.cat([v_ctx, v_blk], 2), None, scaling)

        hidden = self._run_layers(ids, pos, cache.per_layer(), attend)
        return self.logits(hidden[:, 1:])


@dataclass
class DFlashCache:
    """Per draft layer, the K/V [B, nkv, P, d] of the committed context positions (inference)."""

    num_layers: int
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, kv_per_layer: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for i, (k, v) in enumerate(kv_per_layer):
            self.keys[i] = k if self.keys[i] is None else torch.cat([self.keys[i], k], dim=2)
            self.values[i] = v if self.values[i] is None else torch.cat([self.values[i], v], dim=2)

    def per_layer(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        return list(zip(self.keys, self.values, strict=True))
