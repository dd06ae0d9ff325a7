"""The EAGLE-3 draft head, built from transformers' Llama building blocks, readable top to bottom.

Architecture (what vLLM's `LlamaForCausalLMEagle3` and SGLang load; state-dict keys in `Eagle3DraftModel`):

    h      = fc(concat(aux states of the captured target layers))            # [.., n_aux*H_t] -> [.., H]
    x      = concat(input_layernorm(embed_tokens(token)), hidden_norm(h))   # width 2H: q/k/v take 2H
    h      = h + o_proj(attention(x))                                       # residual on the hidden stream
    h      = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(h))                                              # over the DRAFT vocabulary
    next step's hidden input = h (pre-norm), exactly what vLLM feeds back (`hidden_prenorm`)

`d2t` (int64 [Vd]) maps a draft id to a target id: target = draft + d2t[draft]; `t2d` (bool [V]) marks the
target ids that are in the draft vocabulary.

Shifting convention (Supervision tensors are aligned and unshifted, see targets/supervision.py):
    step 0, position t: consumes aux_t (through fc) and the embedding of token t+1, and predicts token t+2,
        i.e. it is trained against the target distribution at position t+1;
    step j, position t: consumes the draft's own step j-1 hidden output at t and the embedding of token
        t+1+j, and predicts token t+2+j (target distribution at position t+1+j).
    Ids past the end of the sequence are filled with 0; the objective masks those positions out.
This is the same pairing vLLM uses at inference: its proposer shifts the target's token ids left by one
and keeps the hidden states and positions unshifted ("row p = (token p+1, hidden p, position p)").

RoPE positions: step j at data position t uses position t + j. At inference vLLM runs step 0 over the
context at the target's positions (pair (token p+1, hidden p) at position p) and then, for each further
draft step, `positions += 1`: the step-j query for the last context position t sits at t + j, attends to
the context's step-0 keys at positions <= t and to the chain's own keys at t+1..t+j. SpecForge and the
EAGLE-3 reference training code do the same (`position_ids + lck`, lck = number of earlier steps). With
this choice training sees exactly the relative distances inference sees (`tests/model` checks that a
TTT step equals an incremental, cache-based inference chain).

Training-time test (TTT) attention: the step-j query at position t attends to
    - the step-0 keys/values at positions s <= t (causal; padding keys masked), and
    - the keys/values of steps 1..j at the SAME position t (the "diagonal" extra keys).
It is computed in memory linear in T (drafters/eagle3/ttt_attention.py): causal attention over the step-0 keys
(fused flash kernels or query chunks) merged with the per-step diagonal terms by log-sum-exp; no [T, T]
score tensor is kept for backward. `attention_impl` ("auto", "fused", "chunked", "dense") picks the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

from modelopt_ext.drafters.eagle3.identity import default_aux_layer_ids
from modelopt_ext.drafters.eagle3.ttt_attention import (  # noqa: F401  (ttt_attention_mask: re-exported)
    is_right_padded,
    ttt_attention,
    ttt_attention_mask,
)
from modelopt_ext.drafters.rope import rope_from_dict as _rope_from_dict
from modelopt_ext.targets.layers import check_layer_ids

# attend(q [B, nh, q, d], k [B, nkv, q, d], v [B, nkv, q, d]) -> [B, nh, q, d]; owns the K/V cache and mask.
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Eagle3Config:
    """Shape of the draft head. `aux_layer_ids` are in vLLM's numbering (id k = residual stream after k
    decoder layers, 0 = embeddings, L = last layer output before the final norm)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary (embed_tokens rows, t2d length)
    draft_vocab_size: int
    aux_layer_ids: list[int]
    target_hidden_size: int | None = None  # default: hidden_size
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # rope_parameters other than rope_theta (None: default RoPE)
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    num_hidden_layers: int = 1  # EAGLE-3 uses one decoder layer; kept for exporters
    extra: dict = field(default_factory=dict)  # e.g. target_model; carried through to_dict/from_dict

    def __post_init__(self) -> None:
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size
        if not self.aux_layer_ids:
            raise ValueError("Eagle3Config.aux_layer_ids must list at least one target layer")
        self.draft_vocab_size = min(self.draft_vocab_size, self.vocab_size)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def num_aux(self) -> int:
        return len(self.aux_layer_ids)

    @classmethod
    def from_target_config(
        cls, hf_config: Any, aux_layer_ids: list[int] | None = None, draft_vocab_size: int | None = None
    ) -> Eagle3Config:
        """The draft head for a target: same width, heads, RoPE and vocabulary as the target's decoder.

        `aux_layer_ids` default to EAGLE-3's rule for the target (identity.py; vLLM numbering; checked by targets/layers.py);
        `draft_vocab_size` defaults to the full target vocabulary.
        """
        if hasattr(hf_config, "get_text_config"):
            hf_config = hf_config.get_text_config()
        g = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        hidden = int(g["hidden_size"])
        heads = int(g["num_attention_heads"])
        theta, scaling = _rope_from_dict(g)
        num_layers = int(g["num_hidden_layers"])
        ids = check_layer_ids(num_layers, aux_layer_ids or default_aux_layer_ids(num_layers))
        vocab = int(g["vocab_size"])
        return cls(
            hidden_size=hidden,
            intermediate_size=int(g["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(g.get("num_key_value_heads") or heads),
            head_dim=int(g.get("head_dim") or hidden // heads),
            vocab_size=vocab,
            draft_vocab_size=min(int(draft_vocab_size or vocab), vocab),
            aux_layer_ids=ids,
            target_hidden_size=hidden,
            rms_norm_eps=float(g.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(g.get("max_position_embeddings", 4096)),
            hidden_act=str(g.get("hidden_act", "silu")),
        )

    def to_dict(self) -> dict:
        """JSON-ready; `extra` keys are merged at the top level."""
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_dict(cls, d: dict) -> Eagle3Config:
        """Read our own `to_dict()` output or an exported HF drafter config (`LlamaForCausalLMEagle3`:
        top-level `eagle_aux_hidden_state_layer_ids`, `rope_parameters` or `rope_theta`/`rope_scaling`)."""
        d = dict(d)
        ids = d.get("aux_layer_ids") or d.get("eagle_aux_hidden_state_layer_ids")
        if not ids and isinstance(d.get("eagle_config"), dict):
            ids = d["eagle_config"].get("eagle_aux_hidden_state_layer_ids")
        if not ids:
            raise ValueError(
                "drafter config has no aux layer ids (aux_layer_ids / eagle_aux_hidden_state_layer_ids)"
            )
        theta, scaling = _rope_from_dict(d)
        special = {"extra", "aux_layer_ids", "rope_theta", "rope_scaling", "num_hidden_layers"}
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k not in special and d.get(k) is not None}
        kw.setdefault("head_dim", int(d["hidden_size"]) // int(d["num_attention_heads"]))
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        kw.setdefault("draft_vocab_size", d["vocab_size"])
        extra = dict(d["extra"]) if isinstance(d.get("extra"), dict) else {}
        if "target_model" in d:
            extra["target_model"] = d["target_model"]
        return cls(
            aux_layer_ids=[int(i) for i in ids], rope_theta=theta, rope_scaling=scaling, extra=extra, **kw
        )

    def rope_parameters(self) -> dict:
        """transformers 5 form: {"rope_type", "rope_theta", ...}."""
        params = {"rope_type": "default", **(self.rope_scaling or {})}
        params["rope_theta"] = self.rope_theta
        return params

    def llama_config(self) -> LlamaConfig:
        """A LlamaConfig for the transformers building blocks (MLP, RoPE)."""
        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            num_hidden_layers=1,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=self.rope_parameters(),
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
        )


# ----------------------------------------------------------------------------------------------------
# Attention: one projection module, two ways to attend (TTT training, cached inference).
# ----------------------------------------------------------------------------------------------------


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Plain eager attention: query [B, nh, q, d] over key/value [B, nkv, P, d]; mask [.., q, P] bool or None."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    s = torch.matmul(query, key.transpose(2, 3)).float() * scaling
    if mask is not None:
        s = s.masked_fill(~mask, torch.finfo(torch.float32).min)
    return torch.matmul(torch.softmax(s, dim=-1).to(query.dtype), value)


class Eagle3Attention(nn.Module):
    """Llama attention whose q/k/v read the 2H-wide [embeddings ; hidden] input. No bias (as references)."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        width = 2 * config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], attend: AttendFn
    ):
        b, q_len, _ = x.shape
        q = self.q_proj(x).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, self.num_heads * self.head_dim))


class Eagle3DecoderLayer(nn.Module):
    """The single EAGLE-3 decoder layer (vLLM `llama_eagle3.LlamaDecoderLayer`, layer 0)."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        llama = config.llama_config()
        self.self_attn = Eagle3Attention(config)
        self.mlp = LlamaMLP(llama)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, embeds, hidden, position_embeddings, attend: AttendFn) -> torch.Tensor:
        """embeds, hidden [B, q, H] -> the layer's output [B, q, H] (pre final norm)."""
        residual = hidden  # vLLM default (norm_before_residual=False): the residual is the raw hidden
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        hidden = residual + self.self_attn(x, position_embeddings, attend)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


# ----------------------------------------------------------------------------------------------------
# The draft model.
# ----------------------------------------------------------------------------------------------------


@dataclass
class Eagle3Output:
    """Per TTT step j: `logits[j]` [B, T, Vd] (predicting token t+2+j) and `hidden[j]` [B, T, H] (pre-norm)."""

    logits: list[torch.Tensor]
    hidden: list[torch.Tensor]


class Eagle3DraftModel(nn.Module):
    """EAGLE-3 draft head. state_dict keys: embed_tokens.weight, fc.weight, layers.0.self_attn.{q,k,v,o}_proj
    .weight, layers.0.mlp.{gate,up,down}_proj.weight, layers.0.{input_layernorm,hidden_norm,
    post_attention_layernorm}.weight, norm.weight, lm_head.weight, d2t, t2d."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)  # initialised from the target's and frozen by default
        self.fc = nn.Linear(config.num_aux * config.target_hidden_size, h, bias=False)
        self.layers = nn.ModuleList([Eagle3DecoderLayer(config)])
        self.norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config.llama_config())  # non-persistent buffers only
        identity = config.draft_vocab_size == config.vocab_size
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        if identity:
            t2d[:] = True
        self.register_buffer("t2d", t2d)
        self.attention_impl = "auto"  # TTT attention backend (drafters/eagle3/ttt_attention.py); not in the export
        self.selects_logits = True  # ttt() takes logits_masks (objective.py asks before passing them)

    # --- setup -------------------------------------------------------------------------------------

    def set_vocab(self, vocab: Any) -> None:
        """Install a draft vocabulary (anything with `d2t` int64 [Vd] and `t2d` bool [V], e.g. DraftVocab)."""
        d2t, t2d = torch.as_tensor(vocab.d2t, dtype=torch.long), torch.as_tensor(vocab.t2d, dtype=torch.bool)
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(
                f"vocab mapping shapes d2t {tuple(d2t.shape)}, t2d {tuple(t2d.shape)} do not fit the draft head "
                f"(draft_vocab_size {self.config.draft_vocab_size}, vocab_size {self.config.vocab_size})"
            )
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    @torch.no_grad()
    def load_embeddings(self, weight: torch.Tensor, freeze: bool = True) -> None:
        """Copy the target's input embeddings [V, H] into `embed_tokens`."""
        if tuple(weight.shape) != tuple(self.embed_tokens.weight.shape):
            raise ValueError(
                f"target embeddings {tuple(weight.shape)} != {tuple(self.embed_tokens.weight.shape)}"
            )
        self.embed_tokens.weight.copy_(weight.to(self.embed_tokens.weight.dtype))
        self.embed_tokens.weight.requires_grad_(not freeze)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocab ids -> target-vocab ids (target = draft + d2t[draft])."""
        return draft_ids + self.d2t[draft_ids]

    # --- one drafting step (shared by training and inference) ----------------------------------------

    def step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attend: AttendFn,
        logits_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the decoder layer: (token ids [B, q], hidden [B, q, H], positions [B, q]) ->
        (draft logits [B, q, Vd], pre-norm hidden [B, q, H] fed to the next step). With `logits_mask`
        (bool [B, q]) the logits are only computed where it holds: [N, Vd] in row-major order."""
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        out = self.layers[0](embeds, hidden, position_embeddings, attend)
        return self.lm_head(self.norm(out if logits_mask is None else out[logits_mask])), out

    # --- training: the training-time test ----------------------------------------------------------

    def ttt(
        self,
        input_ids: torch.Tensor,
        aux_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        steps: int = 7,
        logits_masks: list[torch.Tensor] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Unroll `steps` TTT steps over an aligned, unshifted batch; yields (logits, hidden) per step.

        input_ids [B, T] and aux_hidden_states [B, T, n_aux*H_t] as in `Supervision` (right padding: positions
        are 0..T-1). Step j at position t reads token t+1+j and RoPE position t+j; see the module docstring.
        `logits_masks[j]` (bool [B, T]): step j's logits only where it holds ([N_j, Vd]): the loss needs
        them at its valid positions only, and the head over the vocabulary is the largest matmul.
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        hidden = self.fc(aux_hidden_states.to(self.fc.weight.dtype))
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        scaling = self.layers[0].self_attn.scaling
        right_padded = is_right_padded(attention_mask)  # once for all steps (a device sync on GPU)
        for j in range(steps):

            def attend(q, k, v):
                keys.append(k)
                values.append(v)
                return ttt_attention(
                    q, keys, values, attention_mask, scaling, self.attention_impl, right_padded
                )

            sel = logits_masks[j] if logits_masks is not None else None
            logits, hidden = self.step(shift_left(input_ids, j + 1), hidden, positions + j, attend, sel)
            yield logits, hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        aux_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        ttt_steps: int = 1,
    ) -> Eagle3Output:
        """All TTT steps at once (see `ttt`)."""
        logits, hidden = [], []
        for lg, hd in self.ttt(input_ids, aux_hidden_states, attention_mask, ttt_steps):
            logits.append(lg)
            hidden.append(hd)
        return Eagle3Output(logits=logits, hidden=hidden)

    # --- inference: cached drafting as vLLM does it ---------------------------------------------------

    def new_cache(self) -> DraftCache:
        """An empty inference cache (step-0 keys/values of committed context positions)."""
        return DraftCache()

    def extend(
        self, cache: DraftCache, next_ids: torch.Tensor, aux_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit context positions: pairs (token p+1, target aux states at p) for p = cache.length ...
        next_ids [B, n] are the tokens p+1, aux_hidden_states [B, n, n_aux*H_t] the target states at p.
        Returns (logits, pre-norm hidden) of the LAST position: the first draft step."""
        hidden = self.fc(aux_hidden_states.to(self.fc.weight.dtype))
        b, n = next_ids.shape
        start = cache.length
        positions = torch.arange(start, start + n, device=next_ids.device).expand(b, n)
        scaling = self.layers[0].self_attn.scaling

        def attend(q, k, v):
            cache.append(k, v)
            causal = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(start)
            return masked_attention(q, cache.keys, cache.values, causal, scaling)

        logits, hidden = self.step(next_ids, hidden, positions, attend)
        return logits[:, -1:], hidden[:, -1:]

    def chain_step(
        self, cache: DraftCache, chain: DraftCache, token: torch.Tensor, hidden: torch.Tensor, position: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A further draft step for one position: token [B, 1] (the previous draft), hidden [B, 1, H] (the
        previous step's pre-norm output), at RoPE `position`. Attends to all committed context keys and the
        chain's earlier keys; its own K/V go into `chain` (discarded after verification)."""
        b = token.shape[0]
        pos = torch.full((b, 1), position, dtype=torch.long, device=token.device)
        scaling = self.layers[0].self_attn.scaling

        def attend(q, k, v):
            chain.append(k, v)
            keys = torch.cat([cache.keys, chain.keys], dim=2)
            values = torch.cat([cache.values, chain.values], dim=2)
            return masked_attention(q, keys, values, None, scaling)

        return self.step(token, hidden, pos, attend)


@dataclass
class DraftCache:
    """Keys/values [B, nkv, P, d] of committed positions (inference)."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (drop rejected ones)."""
        if self.keys is not None:
            self.keys = self.keys[:, :, :length]
            self.values = self.values[:, :, :length]


def shift_left(x: torch.Tensor, n: int, fill: float | bool = 0) -> torch.Tensor:
    """x[:, n:] padded at the end with `fill` to the original length (dim 1)."""
    if n == 0:
        return x
    pad = torch.full_like(x[:, :n], fill) if x.shape[1] >= n else torch.full_like(x, fill)
    return torch.cat([x[:, n:], pad], dim=1)[:, : x.shape[1]]
