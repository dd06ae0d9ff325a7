"""The EAGLE-3 training objective: soft cross-entropy of every TTT step against the target distribution.

Alignment (module docstring of drafters/eagle3/modeling.py): TTT step j at position t predicts token t+2+j, so its
target is the target distribution at position t+1+j, i.e. `target_probs` and `position_mask` (from
`resolve_target`, aligned and unshifted) shifted left by j+1. A position counts at step j when its drafter
input is real (attention_mask[t]) and position_mask[t+1+j] holds; positions past the end never count.

    loss_j = mean over valid positions of  -sum_v p_target(v) * log softmax(draft_logits)(v)
    loss   = sum_j step_decay**j * loss_j          (a plain weighted sum, as SpecForge/EAGLE-3 do)
    acc_j  = fraction of valid positions where draft argmax == target argmax (in draft-vocab ids; the
             position mask guarantees the target's argmax is in the draft vocabulary)
    sim_accept_len = 1 + sum_{j<k} prod_{i<=j} acc_i

The draft head's logits are only computed at each step's valid positions (`logits_masks` of the model's
`ttt`, when it offers them): the head over the draft vocabulary and the softmax are the largest part of a
step, and padding, prompt tokens and the sequence end never enter the loss.

The simulated acceptance length is the expected number of tokens per verification in a greedy chain of
k drafts: draft j is accepted only if drafts 0..j all were, and the teacher-forced acc_i approximates the
probability that draft i is right given that the earlier ones were; the 1 is the target's own token.
"""

from __future__ import annotations

from typing import Any

import torch

from modelopt_ext.drafters.eagle3.modeling import shift_left
from modelopt_ext.targets.head import resolve_target
from modelopt_ext.targets.supervision import Supervision


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over mask-True positions of -sum(p * log_softmax(logits)); 0 when no position is valid."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ce = -(target_probs * logp).sum(-1)
    ce = torch.where(mask, ce, torch.zeros_like(ce))
    return ce.sum() / mask.sum().clamp(min=1)


def simulated_acceptance_length(accs: list[float] | torch.Tensor) -> torch.Tensor:
    """1 + sum_j prod_{i<=j} acc_i (see module docstring)."""
    accs = torch.as_tensor(accs, dtype=torch.float32)
    return 1 + torch.cumprod(accs, 0).sum()


def eagle3_loss(
    model: Any,
    sup: Supervision,
    vocab: Any,
    head: Any,
    ttt_steps: int,
    step_decay: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) for one batch. metrics: loss_j, acc_j per step, sim_accept_len, valid_positions
    (step 0's count); metric tensors are detached."""
    model = getattr(model, "module", model)  # tolerate a DDP-style wrapper
    probs, position_mask = resolve_target(sup, head, vocab)
    input_valid = sup.attention_mask.bool()
    total = None
    metrics: dict[str, torch.Tensor] = {}
    accs = []
    with torch.no_grad():
        target_argmax = probs.argmax(-1)  # once; read at each step's shifted positions below
    masks = [shift_left(position_mask, j + 1, False) & input_valid for j in range(ttt_steps)]
    if getattr(model, "selects_logits", False):
        steps = model.ttt(
            sup.input_ids, sup.aux_hidden_states, sup.attention_mask, ttt_steps, logits_masks=masks
        )
    else:
        steps = model.ttt(sup.input_ids, sup.aux_hidden_states, sup.attention_mask, ttt_steps)
    for j, (logits, _hidden) in enumerate(steps):
        mask = masks[j]
        if logits.dim() == 3:  # a model that returns every position: keep the valid ones
            logits = logits[mask]
        # valid (b, t) at step j is trained on the target distribution at (b, t + 1 + j)
        b_idx, t_idx = mask.nonzero(as_tuple=True)
        target = probs[b_idx, t_idx + j + 1]
        ones = torch.ones(len(b_idx), dtype=torch.bool, device=mask.device)
        loss_j = soft_cross_entropy(logits, target, ones)
        n = mask.sum().clamp(min=1)
        with torch.no_grad():
            acc_j = (logits.argmax(-1) == target_argmax[b_idx, t_idx + j + 1]).sum().float() / n
        total = step_decay**j * loss_j if total is None else total + step_decay**j * loss_j
        metrics[f"loss_{j}"] = loss_j.detach()
        metrics[f"acc_{j}"] = acc_j
        if j == 0:
            metrics["valid_positions"] = mask.sum().detach()
        accs.append(acc_j)
    metrics["sim_accept_len"] = simulated_acceptance_length(torch.stack(accs).cpu())
    return total, metrics
