"""Speculative decoding output == the target's greedy output; oracle/garbage drafters bound acceptance."""

from __future__ import annotations

import pytest
import torch

from modelopt_ext.acceptance.specdec import (
    OracleProposer,
    greedy_generate,
    run_benchmark,
    speculative_generate,
)
from modelopt_ext.drafters.eagle3.proposer import Eagle3Proposer
from tests.model.conftest import VOCAB, tiny_draft, tiny_target


def _prompts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def test_greedy_matches_transformers_generate():
    target = tiny_target(seed=1)
    p = _prompts(1)[0]
    ref = target.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(p) :]
    assert greedy_generate(target, p, 12) == ref.tolist()


def test_untrained_eagle_drafter_output_equals_greedy():
    target = tiny_target(seed=1)
    draft = tiny_draft(seed=2)
    draft.load_embeddings(target.model.embed_tokens.weight)
    result, outs = run_benchmark(target, Eagle3Proposer(draft), _prompts(2), num_steps=3, max_new_tokens=12)
    assert result.outputs_match_greedy, result.mismatched_prompts
    assert all(len(o) == 12 for o in outs)
    assert 1.0 <= result.mean_acceptance_length <= 4.0
    assert len(result.acceptance_per_position) == 3


class _Garbage:
    aux_layer_ids = None

    def begin(self, *a):
        pass

    def propose(self, k):
        return [VOCAB - 1] * k  # never what this target picks (checked below)

    def commit(self, *a):
        pass


def test_oracle_gives_k_plus_one_and_garbage_gives_one():
    target = tiny_target(seed=1)
    k, n = 3, 17
    for p in _prompts(2, seed=5):
        ref = greedy_generate(target, p, n + k + 1)
        assert VOCAB - 1 not in ref
        for prop, tau in ((OracleProposer(ref), k + 1), (_Garbage(), 1)):
            from modelopt_ext.acceptance.specdec import DecodeStats

            stats = DecodeStats()
            out = speculative_generate(target, prop, p, k, n, stats=stats)
            assert out == ref[:n]
            assert stats.tokens_from_rounds / stats.rounds == tau
    result, _ = run_benchmark(
        target, OracleProposer(greedy_generate(target, p, 40)), [p], num_steps=4, max_new_tokens=21
    )
    assert result.mean_acceptance_length == 5.0 and result.acceptance_per_position == [1.0] * 4
    assert result.outputs_match_greedy


def test_partially_right_drafter_and_eos():
    """A drafter right on its first draft only: exactly 2 tokens per round; EOS stops both paths alike."""
    target = tiny_target(seed=1)
    p = _prompts(1, seed=9)[0]
    ref = greedy_generate(target, p, 40)

    class FirstRight(OracleProposer):
        def propose(self, k):
            out = super().propose(k)
            return out[:1] + [VOCAB - 1] * (k - 1)

    from modelopt_ext.acceptance.specdec import DecodeStats

    stats = DecodeStats()
    assert speculative_generate(target, FirstRight(ref), p, 3, 25, stats=stats) == ref[:25]
    assert stats.tokens_from_rounds == 2 * stats.rounds
    assert stats.accepted_per_pos == [stats.rounds, 0, 0]
    eos = ref[6]
    want = greedy_generate(target, p, 40, eos_ids={eos})
    assert want[-1] == eos and len(want) <= 7
    assert speculative_generate(target, OracleProposer(ref), p, 3, 40, eos_ids={eos}) == want


def test_eagle_proposer_with_reduced_vocab_and_prenorm_layer():
    target = tiny_target(seed=3)
    draft = tiny_draft(seed=4, draft_vocab_size=100, aux=(0, 2, 4))

    class V:
        d2t = torch.arange(100) * 3 - torch.arange(100)
        t2d = torch.zeros(VOCAB, dtype=torch.bool).index_fill_(0, torch.arange(100) * 3, True)

    draft.set_vocab(V)
    draft.load_embeddings(target.model.embed_tokens.weight)
    result, _ = run_benchmark(
        target, Eagle3Proposer(draft), _prompts(2, seed=3), num_steps=2, max_new_tokens=10
    )
    assert result.outputs_match_greedy


def test_warp_top_p_keeps_the_smallest_set_reaching_p():
    from modelopt_ext.acceptance.specdec import Sampling, warp

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(warp(logits, Sampling(1.0)), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=1e-6)
    p = warp(logits, Sampling(1.0, top_p=0.8))  # 0.5 + 0.3 reaches 0.8: two tokens kept
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(warp(logits, Sampling(1.0, top_p=0.1)), torch.tensor([1.0, 0, 0, 0]))
    hot = warp(logits, Sampling(2.0))
    assert hot[0] < 0.5 and hot[3] > 0.05  # higher temperature flattens


def test_verify_sampled_edge_cases():
    from modelopt_ext.acceptance.specdec import verify_sampled

    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert verify_sampled(p, [1, 2], None, g) == (2, 0)  # certain drafts: all accepted, bonus from p_3
    assert verify_sampled(p, [0, 2], None, g) == (0, 1)  # p(d)=0: rejected, residual = p without d
    q = p[:2].clone()
    assert verify_sampled(p, [1, 2], q, g) == (2, 0)  # q == p: always accepted
    # q puts its mass on a token p never emits: rejected, and the residual never emits it either.
    p2 = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    q2 = torch.tensor([[0.0, 0.0, 1.0]])
    outs = {verify_sampled(p2, [2], q2, g) for _ in range(50)}
    assert outs == {(0, 0), (0, 1)}


def test_sweep_and_repetition():
    from modelopt_ext.acceptance.specdec import repeated_ngram_fraction, sweep_chain_length

    assert repeated_ngram_fraction([[1, 2, 3, 4, 5, 6]]) == 0.0
    assert repeated_ngram_fraction([[1, 2, 3, 4] * 3]) == pytest.approx(5 / 9)  # 9 4-grams, 4 distinct
    assert repeated_ngram_fraction([[1, 2]]) == 0.0
    target = tiny_target(seed=1)
    p = _prompts(1, seed=3)[0]
    ref = greedy_generate(target, p, 30)
    rows = sweep_chain_length(target, OracleProposer(ref), [p], 4, max_new_tokens=21)
    assert [r.num_steps for r in rows] == [1, 2, 3, 4]
    for r in rows:  # the oracle is always right: k + 1 tokens per round until the last one
        assert r.outputs_match_greedy and r.mean_acceptance_length > r.num_steps + 0.5
        assert r.tokens_per_s_baseline == rows[0].tokens_per_s_baseline  # one target-alone run
