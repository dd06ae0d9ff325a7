"""DFlash objective: anchors, label alignment, position decay, metrics (a stub model with known outputs)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from modelopt_ext.data.draft_vocab import DraftVocab
from modelopt_ext.drafters.dflash.objective import dflash_loss, sample_anchors, weights_of
from modelopt_ext.targets.supervision import Supervision

V = 16


def _vocab():
    return DraftVocab(d2t=torch.zeros(V, dtype=torch.long), t2d=torch.ones(V, dtype=torch.bool))


class Oracle(torch.nn.Module):
    """Block position k of anchor a outputs a one-hot of the data token at a+k (or of `wrong_at` positions'
    token + 1): the objective must read it as correct exactly where it is."""

    def __init__(self, block_size, wrong_at=()):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)
        self.w = torch.nn.Parameter(torch.ones(()))
        self.wrong_at = set(wrong_at)
        self.seen_anchors = None

    def forward(self, input_ids, aux, anchors):
        self.seen_anchors = anchors
        b, t = input_ids.shape
        bs = self.config.block_size
        pos = (anchors[:, :, None] + torch.arange(bs)).clamp(max=t - 1)
        tok = torch.gather(input_ids, 1, pos.view(b, -1)).view(b, -1, bs)
        for k in self.wrong_at:
            tok[:, :, k] = (tok[:, :, k] + 1) % V
        return torch.nn.functional.one_hot(tok.view(b, -1), V).float() * 30 * self.w

    def logits(self, hidden):
        return hidden


def _sup(ids, loss_mask):
    b, t = ids.shape
    logits = torch.full((b, t, V), -30.0)
    logits[:, :-1].scatter_(2, ids[:, 1:, None], 30.0)  # the target predicts the data exactly
    return Supervision(
        input_ids=ids,
        attention_mask=torch.ones(b, t, dtype=torch.bool),
        loss_mask=loss_mask,
        aux_hidden_states=torch.zeros(b, t, 4),
        target_logits=logits,
    )


def test_anchors_are_distinct_valid_positions():
    torch.manual_seed(0)
    valid = torch.zeros(3, 20, dtype=torch.bool)
    valid[0, 5:15] = True
    valid[1, [2, 7]] = True
    anchors, keep = sample_anchors(valid, 6)
    assert anchors.shape == (3, 6)
    assert keep.sum(1).tolist() == [6, 2, 0]
    for b in range(3):
        kept = anchors[b][keep[b]].tolist()
        assert len(set(kept)) == len(kept) and all(valid[b, a] for a in kept)
        assert kept == sorted(kept)
    assert sample_anchors(valid, 100)[0].shape[1] == 10  # capped by the largest valid count


def test_perfect_drafter_accepts_every_supervised_position():
    torch.manual_seed(0)
    bs, t = 4, 24
    ids = torch.randint(0, V, (2, t))
    loss_mask = torch.zeros(2, t, dtype=torch.bool)
    loss_mask[:, 6:] = True  # the assistant turn: tokens 6..23
    model = Oracle(bs)
    loss, m = dflash_loss(model, _sup(ids, loss_mask), _vocab(), None, num_anchors=50, gamma=4.0)
    anchors = model.seen_anchors
    # anchors: positions whose next token is supervised (5..22), never the last one
    assert int(anchors.min()) >= 5 and int(anchors.max()) <= t - 2
    assert float(loss.detach()) < 1e-6
    assert all(float(m[f"acc_{j}"]) == 1.0 for j in range(bs - 1))
    # blocks that run past the end accept fewer: exactly the positions inside the sequence
    runs = [min(bs - 1, t - 1 - a) for a in anchors.flatten().tolist()]
    assert float(m["sim_accept_len"]) == pytest.approx(1 + sum(runs) / len(runs))
    assert int(m["valid_positions"]) == anchors.numel()


def test_a_wrong_position_stops_acceptance_and_costs_decayed_loss():
    torch.manual_seed(1)
    bs, t = 5, 40
    ids = torch.randint(0, V, (1, t))
    loss_mask = torch.ones(1, t, dtype=torch.bool)
    model = Oracle(bs, wrong_at={2})  # block position 2 = the second draft (j = 1)
    loss, m = dflash_loss(model, _sup(ids, loss_mask), _vocab(), None, num_anchors=8, gamma=2.0)
    assert float(m["acc_0"]) == 1.0 and float(m["acc_1"]) == 0.0 and float(m["acc_2"]) == 1.0
    assert float(m["sim_accept_len"]) == pytest.approx(2.0)  # only the first draft is accepted
    # per-position CE is 30 (the logit gap) at j=1 only; the loss is its weighted share
    w = weights_of(bs, 2.0)
    assert float(m["loss_1"]) == pytest.approx(30.0, rel=1e-4)
    # blocks near the end have fewer positions inside the sequence (k <= t-1-a)
    ks = [range(1, min(bs - 1, t - 1 - a) + 1) for a in model.seen_anchors.flatten().tolist()]
    want = 30.0 * sum(w[1] for r in ks if 2 in r) / sum(w[k - 1] for r in ks for k in r)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)
    assert w == [1.0, math.exp(-0.5), math.exp(-1.0), math.exp(-1.5)]


def test_distillation_uses_the_target_row_before_the_token():
    """Soft targets: the target distribution over x_{a+k} sits at row a+k-1 (aligned, unshifted)."""
    torch.manual_seed(2)
    bs, t = 3, 12
    ids = torch.randint(0, V, (1, t))
    loss_mask = torch.ones(1, t, dtype=torch.bool)
    loss, m = dflash_loss(Oracle(bs), _sup(ids, loss_mask), _vocab(), None, num_anchors=4, gamma=1.0,
                          distillation=1.0)  # fmt: skip
    assert float(loss.detach()) < 1e-6 and float(m["acc_1"]) == 1.0


def test_nothing_supervised_is_a_zero_loss_that_backpropagates():
    ids = torch.randint(0, V, (1, 8))
    loss, m = dflash_loss(Oracle(4), _sup(ids, torch.zeros(1, 8, dtype=torch.bool)), _vocab(), None,
                          num_anchors=4, gamma=1.0)  # fmt: skip
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(m["valid_positions"]) == 0


def test_chunked_checkpointed_logits_give_the_same_loss_and_gradients(monkeypatch):
    """The loss makes the vocabulary logits a few rows at a time (recomputed in backward): same numbers."""
    from modelopt_ext.drafters.dflash import objective
    from tests.drafters.dflash.test_modeling import make_draft

    model = make_draft(block_size=4).train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 299, (2, 20), generator=g)
    logits = torch.randn(2, 20, 300, generator=g)
    mask = torch.ones(2, 20, dtype=torch.bool)
    sup = Supervision(input_ids=ids, attention_mask=mask, loss_mask=mask,
                      aux_hidden_states=torch.randn(2, 20, 3 * 128, generator=g), target_logits=logits)  # fmt: skip
    vocab = DraftVocab(d2t=torch.zeros(300, dtype=torch.long), t2d=torch.ones(300, dtype=torch.bool))
    results = []
    for chunk in (10_000, 5):
        monkeypatch.setattr(objective, "ROWS_PER_CHUNK", chunk)
        model.zero_grad()
        torch.manual_seed(0)  # same anchors
        loss, m = dflash_loss(model, sup, vocab, None, num_anchors=6, gamma=2.0, distillation=0.3)
        loss.backward()
        results.append((loss.detach(), m["sim_accept_len"], [p.grad.clone() for p in model.parameters()]))
    (l1, s1, g1), (l2, s2, g2) = results
    torch.testing.assert_close(l1, l2)
    assert float(s1) == float(s2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
