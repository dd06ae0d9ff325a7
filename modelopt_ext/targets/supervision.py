"""The supervision contract: the one batch type every source yields and the trainer consumes.

Sources (colocated target, offline dumps, vLLM streaming, the remote target server) all produce a
`Supervision`; the trainer never knows where it came from. Tensors are aligned, NOT shifted: position t
holds what the target computed after reading tokens 0..t, and the target distribution at t is over the
token at t+1. The trainer does the EAGLE shifting.

The target distribution arrives in exactly one of three forms, cheapest to ship last:
- `target_logits` [B, T, V]: full-vocabulary logits (colocated source);
- `target_probs` [B, T, Vd]: softmax over the draft-vocabulary columns of the logits (remote server);
- `target_last_hidden` [B, T, H]: the target's last decoder layer output BEFORE its final norm (vLLM's
  layer id L); the trainer turns it into logits with `TargetHead` (final norm + lm_head only).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Supervision:
    """One batch of supervision for the drafter (shapes: B batch, T tokens, H target hidden size)."""

    input_ids: torch.Tensor  # int64 [B, T]
    attention_mask: torch.Tensor  # bool [B, T]; False on padding
    loss_mask: torch.Tensor  # bool [B, T]; True on assistant tokens (the ones the drafter learns to predict)
    aux_hidden_states: torch.Tensor  # [B, T, n_aux * H], captured layers concatenated in aux_layer_ids order
    target_logits: torch.Tensor | None = None  # [B, T, V]
    target_probs: torch.Tensor | None = None  # [B, T, Vd]
    target_last_hidden: torch.Tensor | None = None  # [B, T, H], pre-final-norm

    def __post_init__(self) -> None:
        forms = [
            f for f in ("target_logits", "target_probs", "target_last_hidden") if getattr(self, f) is not None
        ]
        if len(forms) != 1:
            raise ValueError(f"Supervision needs exactly one target form, got {forms or 'none'}")
        b, t = self.input_ids.shape
        for name in ("attention_mask", "loss_mask"):
            if tuple(getattr(self, name).shape) != (b, t):
                raise ValueError(
                    f"Supervision.{name} has shape {tuple(getattr(self, name).shape)}, expected {(b, t)}"
                )
        for name in ("aux_hidden_states", forms[0]):
            shape = tuple(getattr(self, name).shape)
            if shape[:2] != (b, t) or len(shape) != 3:
                raise ValueError(f"Supervision.{name} has shape {shape}, expected ({b}, {t}, ...)")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Supervision:
        """A copy on `device` (dtypes unchanged)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return Supervision(**kw)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Field name -> tensor (None where unset), e.g. for a wire format."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def nbytes(self) -> int:
        """Bytes this batch occupies: the cost of shipping it between processes."""
        return sum(v.numel() * v.element_size() for v in self.tensors().values() if v is not None)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens in the batch."""
        return int(self.attention_mask.sum())
