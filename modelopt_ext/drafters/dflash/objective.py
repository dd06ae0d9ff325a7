"""The DFlash training objective: random anchored blocks, all in one forward, position-decayed cross-entropy.

Per sequence, up to `num_anchors` anchors a are drawn (uniformly, without replacement) among the positions
whose next token is supervised: `position_mask[a]` from `resolve_target` (loss_mask[a+1], a real token, the
target's argmax in the vocabulary). Block i is [x_a, MASK x (B-1)] at positions a..a+B-1; it sees the target
features at positions < a and itself (modeling.py's block mask), as at inference, where the target has not
read the anchor yet. All blocks of the batch run in ONE forward.

Block position k (1..B-1) predicts token x_{a+k}. Its targets (Supervision is aligned and unshifted, so the
target distribution over x_{a+k} sits at row a+k-1):
    hard: the data token input_ids[a+k]          (z-lab / SpecForge / Model-Optimizer's CE)
    soft: target_probs[a+k-1]                      (distillation, Model-Optimizer's KD)
and it counts when position_mask[a+k-1] holds (so x_{a+k} is a supervised token) and the anchor was drawn.

    ce(k)  = (1 - distillation) * CE(logits, x_{a+k}) + distillation * softCE(logits, p_target)
    loss   = sum_k w_k * sum_valid ce(k) / sum_k w_k * n_valid(k),    w_k = exp(-(k-1)/gamma)

Metrics (drafters/base.py contract; j = k-1 is the index of the drafted token):
    loss_j, acc_j  mean ce and top-1 agreement with the TARGET's argmax (what greedy verification accepts)
                   over the valid positions k = j+1;
    sim_accept_len 1 + the mean, over blocks whose first draft counts, of the number of leading drafts that
                   agree with the target's argmax: the acceptance length greedy verification would give with
                   the context teacher-forced (a block drafts all its tokens from the same context, so this
                   is read per block, not multiplied across positions as for a chain drafter);
    valid_positions the blocks whose first draft counts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from modelopt_ext.targets.head import resolve_target
from modelopt_ext.targets.supervision import Supervision

ROWS_PER_CHUNK = 1024  # block positions whose logits exist at once (see _block_ce)


def sample_anchors(valid: torch.Tensor, num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors [B, n] (sorted, drawn without replacement where `valid` [B, T] holds; torch's global RNG)
    and keep [B, n] (False for the padding entries of sequences with fewer than n valid positions).
    n = min(num_anchors, the largest valid count), at least 1 (an all-padding anchor when none is valid)."""
    b, t = valid.shape
    counts = valid.sum(1)
    n = max(1, min(num_anchors, int(counts.max())))
    r = torch.rand(b, t, device=valid.device)
    r = torch.where(valid, r, torch.full_like(r, 2.0))  # invalid positions sort last
    order = r.argsort(dim=1)[:, :n]
    keep = torch.arange(n, device=valid.device)[None, :] < counts[:, None].clamp(max=n)
    anchors = torch.where(keep, order, torch.zeros_like(order))
    anchors, idx = anchors.sort(dim=1)
    keep = torch.gather(keep, 1, idx)
    return anchors, keep


def dflash_loss(
    model: Any,
    sup: Supervision,
    vocab: Any,
    head: Any,
    *,
    num_anchors: int,
    gamma: float,
    distillation: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) for one batch (module docstring); metric tensors are detached."""
    model = getattr(model, "module", model)  # tolerate a DDP-style wrapper
    probs, position_mask = resolve_target(sup, head, vocab)
    bs = model.config.block_size
    b, t = sup.input_ids.shape
    anchors, keep = sample_anchors(position_mask, num_anchors)
    hidden = model(sup.input_ids, sup.aux_hidden_states, anchors)  # [B, n*Bs, H]
    n = anchors.shape[1]
    hidden = hidden.view(b, n, bs, -1)[:, :, 1:]  # positions k = 1..Bs-1

    k = torch.arange(1, bs, device=anchors.device)
    rows = anchors[:, :, None] + k - 1  # the target row for position k: a + k - 1
    inside = rows < t
    rows_c = rows.clamp(max=t - 1)
    valid = keep[:, :, None] & inside & torch.gather(position_mask, 1, rows_c.view(b, -1)).view_as(rows)
    bi, ni, ki = valid.nonzero(as_tuple=True)
    r = rows_c[bi, ni, ki]
    with torch.no_grad():
        target_argmax = probs.argmax(-1)[bi, r]
    hard = sup.input_ids[bi, r + 1]
    soft = probs if distillation > 0 else None
    ce, correct = _block_ce(model, hidden[bi, ni, ki], hard, soft, (bi, r), target_argmax, distillation)
    weights = torch.exp(-(ki.float()) / gamma)  # ki = k - 1
    if len(ce):
        loss = (ce * weights).sum() / weights.sum()
    else:
        loss = hidden.sum() * 0.0  # nothing supervised in this batch: a zero loss that still backpropagates

    metrics: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        hits = torch.zeros(b, n, bs - 1, dtype=torch.bool, device=valid.device)
        hits[bi, ni, ki] = correct
        for j in range(bs - 1):
            at = ki == j
            cnt = at.sum().clamp(min=1)
            metrics[f"loss_{j}"] = ce[at].sum().detach() / cnt
            metrics[f"acc_{j}"] = correct[at].sum().float() / cnt
        first = valid[:, :, 0]
        run = hits.long().cumprod(dim=2).sum(dim=2)  # leading drafts that agree, per block
        blocks = first.sum()
        metrics["sim_accept_len"] = (1 + run[first].float().sum() / blocks.clamp(min=1)).cpu()
        metrics["valid_positions"] = blocks.detach()
    return loss, metrics


def _block_ce(model, hidden, hard, soft, rows, target_argmax, distillation):
    """Per position: (ce [M], draft argmax == target argmax [M]) from post-norm hidden states [M, H].

    The logits over the vocabulary are the largest tensors of the step ([M, V] fp32: 4.7 GB for 7680 block
    positions of a 152K vocabulary), so they are made `chunk` rows at a time and recomputed in backward
    (activation checkpointing) instead of kept: memory O(chunk * V)."""
    from torch.utils.checkpoint import checkpoint

    def piece(h, hard_c, idx_b, idx_r):
        logp = torch.log_softmax(model.logits(h).float(), dim=-1)
        ce = torch.zeros(len(h), device=h.device)
        if distillation < 1:
            ce = ce + (1 - distillation) * F.nll_loss(logp, hard_c, reduction="none")
        if distillation > 0:
            ce = ce + distillation * -(soft[idx_b, idx_r] * logp).sum(-1)
        return ce, logp.argmax(-1)

    ces, preds = [], []
    bi, r = rows
    chunk = ROWS_PER_CHUNK
    for s in range(0, len(hidden), chunk):
        e = s + chunk
        args = (hidden[s:e], hard[s:e], bi[s:e], r[s:e])
        # Under torch.compile (training.compile) dynamo cannot trace this checkpoint's closure: plain pieces.
        if torch.is_grad_enabled() and hidden.requires_grad and not torch.compiler.is_compiling():
            ce, pred = checkpoint(piece, *args, use_reentrant=False)
        else:
            ce, pred = piece(*args)
        ces.append(ce)
        preds.append(pred)
    if not ces:
        return hidden.new_zeros(0), torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return torch.cat(ces), torch.cat(preds) == target_argmax


def weights_of(block_size: int, gamma: float) -> list[float]:
    """The position weights exp(-(k-1)/gamma), k = 1..B-1 (for docs and tests)."""
    return [math.exp(-(k - 1) / gamma) for k in range(1, block_size)]
