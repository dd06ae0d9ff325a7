"""The few target tensors a trainer needs, read selectively, and turning supervision into target probabilities.

A trainer fed by vLLM never loads the whole target: `TargetHead` holds only the target's final norm, its
lm_head and its input embeddings (to seed the drafter), read tensor by tensor from the target's safetensors
(sharded `model.safetensors.index.json` or a single `model.safetensors`; tied embeddings handled).

`resolve_target` is the one place where any Supervision form becomes what the loss consumes:

    target_probs [B, T, Vd] fp32: softmax over the DRAFT-vocabulary columns of the target logits at t
    position_mask [B, T] bool:    the distribution at t is a training target, i.e.
                                  loss_mask[t+1] (the token it predicts is a supervised token)
                                  & attention_mask[t]
                                  & the target's argmax at t is in the draft vocabulary.

Both stay aligned and unshifted like the Supervision (the objective does the EAGLE shift).
A producer that ships `target_probs` (the remote server) computes them with `probs_from_logits`, which
zeroes the rows whose argmax is outside the draft vocabulary; `resolve_target` masks all-zero rows, so a
remote run sees exactly the mask a colocated run computes from the full logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from modelopt_ext.targets.supervision import Supervision

# Key candidates in preference order (plain causal LMs first, then common multimodal wrappers).
NORM_KEYS = ("model.norm.weight", "model.language_model.norm.weight", "language_model.model.norm.weight")
LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "model.language_model.lm_head.weight")
EMBED_KEYS = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
)


class TargetRMSNorm(nn.Module):
    """The target's final RMSNorm (fp32 statistics like transformers). `offset` 1.0 for Gemma-style
    norms that scale by (1 + weight)."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return ((self.weight.float() + self.offset) * h).to(dtype)
        return self.weight * h.to(dtype)


class TargetHead(nn.Module):
    """Target final norm + lm_head (+ input embeddings), never the whole target."""

    def __init__(
        self,
        norm: TargetRMSNorm,
        lm_head_weight: torch.Tensor,
        embed_weight: torch.Tensor | None = None,
        read_keys: tuple[str, ...] = (),
    ):
        super().__init__()
        self.norm = norm
        self.lm_head = nn.Parameter(lm_head_weight, requires_grad=False)
        self.embed_tokens = None if embed_weight is None else nn.Parameter(embed_weight, requires_grad=False)
        self.read_keys = read_keys  # which tensors were read from disk (the selective-read check)

    @property
    def vocab_size(self) -> int:
        return self.lm_head.shape[0]

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Pre-final-norm last hidden state (vLLM layer id L) [.., H] -> target logits [.., V]."""
        h = self.norm(last_hidden.to(self.lm_head.dtype))
        return torch.nn.functional.linear(h, self.lm_head)

    @classmethod
    def from_model(cls, model: nn.Module) -> TargetHead:
        """Share the tensors of an already loaded transformers causal LM (colocated runs)."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        norm_mod = model.get_decoder().norm
        eps = getattr(norm_mod, "variance_epsilon", getattr(norm_mod, "eps", _eps(cfg.to_dict())))
        norm = TargetRMSNorm(norm_mod.weight.detach(), float(eps), _norm_offset(cfg.to_dict()))
        return cls(
            norm, model.get_output_embeddings().weight.detach(), model.get_input_embeddings().weight.detach()
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        with_embeddings: bool = True,
    ) -> TargetHead:
        """Read the final norm, lm_head and (optionally) input embeddings from a local HF folder."""
        folder = Path(path)
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file}: not found (a target model folder needs config.json)")
        cfg = json.loads(cfg_file.read_text())
        text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        weight_map = _weight_map(folder)
        norm_key = _pick(weight_map, NORM_KEYS, "final norm")
        embed_key = _pick(weight_map, EMBED_KEYS, "input embeddings", required=False)
        tied = bool(cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))
        head_key = None if tied else _pick(weight_map, LM_HEAD_KEYS, "lm_head", required=False)
        if head_key is None and embed_key is None:
            raise KeyError(
                f"{folder}: neither lm_head.weight nor embed_tokens.weight found in the safetensors"
            )
        wanted = {norm_key, head_key or embed_key}
        if with_embeddings and embed_key:
            wanted.add(embed_key)
        tensors = _read(folder, weight_map, wanted, device)
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        norm = TargetRMSNorm(tensors[norm_key], _eps(text_cfg), _norm_offset(text_cfg))
        head = tensors[head_key or embed_key]
        embed = tensors.get(embed_key) if with_embeddings and embed_key else None
        return cls(norm, head, embed, read_keys=tuple(sorted(wanted)))


def _eps(cfg: dict) -> float:
    return float(cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", cfg.get("layer_norm_epsilon", 1e-6))))


def _norm_offset(cfg: dict) -> float:
    # Gemma-family RMSNorm multiplies by (1 + weight).
    return 1.0 if str(cfg.get("model_type", "")).startswith("gemma") else 0.0


def _weight_map(folder: Path) -> dict[str, str]:
    """tensor name -> safetensors file name."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {k: single.name for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _pick(
    weight_map: dict[str, str], candidates: tuple[str, ...], what: str, required: bool = True
) -> str | None:
    for k in candidates:
        if k in weight_map:
            return k
    suffix = candidates[0].split(".", 1)[1] if candidates[0].startswith("model.") else candidates[0]
    hits = sorted((k for k in weight_map if k.endswith(suffix) and ".layers." not in k), key=len)
    if hits:
        return hits[0]
    if required:
        raise KeyError(f"target safetensors have no {what} tensor (looked for {', '.join(candidates)})")
    return None


def _read(folder: Path, weight_map: dict[str, str], keys: set[str], device) -> dict[str, torch.Tensor]:
    """Read exactly `keys`, opening each shard once."""
    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(weight_map[k], []).append(k)
    out = {}
    for fname, names in by_file.items():
        with safe_open(str(folder / fname), framework="pt", device=str(device)) as f:
            for k in names:
                out[k] = f.get_tensor(k)
    return out


# ----------------------------------------------------------------------------------------------------
# Supervision -> (target_probs, position_mask)
# ----------------------------------------------------------------------------------------------------


def selected_ids(vocab: Any) -> torch.Tensor:
    """Target ids of the draft vocabulary, in draft order (arange(Vd) + d2t)."""
    ids = getattr(vocab, "selected_ids", None)
    if ids is None:
        d2t = torch.as_tensor(vocab.d2t)
        ids = torch.arange(len(d2t), device=d2t.device) + d2t
    return torch.as_tensor(ids, dtype=torch.long)


def probs_from_logits(logits: torch.Tensor, vocab: Any) -> torch.Tensor:
    """Full-vocabulary logits [.., V] -> fp32 softmax over the draft columns [.., Vd]; rows whose target
    argmax is outside the draft vocabulary are all zeros (they carry no usable target)."""
    t2d = torch.as_tensor(vocab.t2d, dtype=torch.bool).to(logits.device)
    if len(t2d) == logits.shape[-1] and bool(t2d.all()):
        # The full vocabulary in target order (d2t all zeros): no column gather, every argmax is in it.
        return torch.softmax(logits.float(), dim=-1)
    sel = selected_ids(vocab).to(logits.device)
    probs = torch.softmax(logits.float().index_select(-1, sel), dim=-1)
    in_vocab = t2d[logits.argmax(-1)]
    return probs * in_vocab.unsqueeze(-1)


def resolve_target(
    sup: Supervision, head: TargetHead | None, vocab: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(target_probs fp32 [B, T, Vd], position_mask bool [B, T]) from any Supervision form (module doc)."""
    if sup.target_probs is not None:
        probs = sup.target_probs.float()
    elif sup.target_logits is not None:
        probs = probs_from_logits(sup.target_logits, vocab)
    else:
        if head is None:
            raise ValueError(
                "Supervision carries target_last_hidden: a TargetHead is needed to compute logits"
            )
        probs = probs_from_logits(head.logits(sup.target_last_hidden), vocab)
    nxt = torch.zeros_like(sup.loss_mask, dtype=torch.bool)
    nxt[:, :-1] = sup.loss_mask[:, 1:].bool()
    mask = nxt & sup.attention_mask.bool() & (probs.sum(-1) > 0)
    return probs, mask
