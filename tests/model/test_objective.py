"""eagle3_loss on hand-computed cases, and a real draft head learning a tiny batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modelopt_ext.drafters.eagle3.objective import eagle3_loss, simulated_acceptance_length
from modelopt_ext.targets.supervision import Supervision
from tests.model.conftest import VOCAB, IdentityVocab, tiny_draft, tiny_target


class FixedSteps:
    """A 'model' whose TTT steps return given logits (so the loss can be computed by hand)."""

    def __init__(self, logits):
        self.logits = logits
        self.calls = []

    def ttt(self, input_ids, aux, attention_mask, steps):
        self.calls.append(steps)
        for j in range(steps):
            yield self.logits[j], None


def _ce(logits, p):
    logits = np.asarray(logits, dtype=np.float64)
    logp = logits - np.log(np.exp(logits).sum())
    return float(-(np.asarray(p) * logp).sum())


def test_hand_computed_two_steps():
    # T=4, Vd=V=2, one sequence. target_probs at positions 0..3 (distribution over the token after each).
    p = [[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.3, 0.7]]
    loss_mask = [[False, True, True, True]]
    # position_mask[t] = loss_mask[t+1] -> [1, 1, 1, 0]
    l0 = [[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0], [7.0, -7.0]]]
    l1 = [[[0.0, 3.0], [1.0, 0.0], [9.0, 9.0], [9.0, 9.0]]]
    sup = Supervision(
        input_ids=torch.zeros(1, 4, dtype=torch.long),
        attention_mask=torch.ones(1, 4, dtype=torch.bool),
        loss_mask=torch.tensor(loss_mask),
        aux_hidden_states=torch.zeros(1, 4, 3),
        target_probs=torch.tensor([p]),
    )
    model = FixedSteps([torch.tensor(l0), torch.tensor(l1)])
    loss, m = eagle3_loss(model, sup, IdentityVocab([0, 1], 2), None, ttt_steps=2, step_decay=0.5)
    # step 0: position t is trained on the distribution at t+1, valid where position_mask[t+1]: t = 0, 1
    loss0 = (_ce(l0[0][0], p[1]) + _ce(l0[0][1], p[2])) / 2
    # step 1: distribution at t+2, valid where position_mask[t+2]: t = 0 only
    loss1 = _ce(l1[0][0], p[2])
    assert model.calls == [2]
    assert m["loss_0"].item() == pytest.approx(loss0, rel=1e-6)
    assert m["loss_1"].item() == pytest.approx(loss1, rel=1e-6)
    assert loss.item() == pytest.approx(loss0 + 0.5 * loss1, rel=1e-6)
    # accuracies: step 0 argmax [0, 1] vs target argmax [0 (p1), 1 (p2)] -> 1.0; step 1: argmax 1 vs 1 -> 1.0
    assert m["acc_0"].item() == 1.0 and m["acc_1"].item() == 1.0
    assert m["sim_accept_len"].item() == pytest.approx(3.0)
    assert m["valid_positions"].item() == 2


def test_padding_and_out_of_vocab_positions_are_excluded():
    # V=3, draft vocab {0, 1}: target logits whose argmax is token 2 carry no target.
    logits = torch.tensor([[[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0], [1.0, 0, 0]]])
    sup = Supervision(
        input_ids=torch.zeros(1, 5, dtype=torch.long),
        attention_mask=torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool),
        loss_mask=torch.tensor([[0, 1, 1, 1, 0]], dtype=torch.bool),
        aux_hidden_states=torch.zeros(1, 5, 3),
        target_logits=logits,
    )
    draft_logits = torch.tensor([[[0.0, 1.0]] * 5])
    _, m = eagle3_loss(FixedSteps([draft_logits]), sup, IdentityVocab([0, 1], 3), None, 1, 0.8)
    # position_mask = loss_mask[t+1] & in-vocab argmax = [1 (argmax 0), 1 (argmax 1), 0 (argmax 2), 0, 0]
    # step 0 uses position_mask[t+1]: t=0 -> pm[1]=1, t=1 -> pm[2]=0, others 0 -> one valid position
    assert m["valid_positions"].item() == 1
    p = torch.softmax(torch.tensor([0.0, 5.0]), 0).numpy()
    assert m["loss_0"].item() == pytest.approx(_ce([0.0, 1.0], p), rel=1e-6)
    assert m["acc_0"].item() == 1.0


def test_no_valid_positions_gives_zero_not_nan():
    sup = Supervision(
        input_ids=torch.zeros(1, 3, dtype=torch.long),
        attention_mask=torch.ones(1, 3, dtype=torch.bool),
        loss_mask=torch.zeros(1, 3, dtype=torch.bool),
        aux_hidden_states=torch.zeros(1, 3, 3),
        target_probs=torch.full((1, 3, 2), 0.5),
    )
    loss, m = eagle3_loss(FixedSteps([torch.zeros(1, 3, 2)]), sup, IdentityVocab([0, 1], 2), None, 1, 0.8)
    assert loss.item() == 0.0 and not math.isnan(m["acc_0"].item())


def test_simulated_acceptance_length_formula():
    assert simulated_acceptance_length([0.5, 0.5, 0.5]).item() == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert simulated_acceptance_length([1.0, 0.0, 1.0]).item() == pytest.approx(2.0)


def test_real_head_learns_a_batch():
    from modelopt_ext.supply.colocated import ColocatedSource

    target = tiny_target(seed=7)
    src = ColocatedSource(target, [1, 2, 4])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    am = torch.ones(2, 12, dtype=torch.bool)
    sup = src({"input_ids": ids, "attention_mask": am, "loss_mask": am})
    draft = tiny_draft(seed=1)
    draft.load_embeddings(target.model.embed_tokens.weight)
    draft.train()
    vocab = IdentityVocab(torch.arange(VOCAB), VOCAB)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(25):
        loss, m = eagle3_loss(draft, sup, vocab, None, ttt_steps=3, step_decay=0.8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert set(m) >= {"loss_0", "loss_1", "loss_2", "acc_0", "acc_1", "acc_2", "sim_accept_len"}
    assert loss.item() < 0.5 * first
    assert m["acc_0"].item() > 0.5 and m["sim_accept_len"].item() > 1.5
