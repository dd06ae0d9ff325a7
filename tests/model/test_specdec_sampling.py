"""Speculative sampling keeps the target's output distribution (chi-square on the tiny target).

The target is the fitted tiny Llama of `modelopt_ext.targets.tiny` (built once, cached like the vLLM tests' one).
From one chat prompt with an uncertain answer, N sequences of 3 tokens are drawn twice: by plain sampling from the target (batched)
and by chain speculative decoding with rejection sampling (`speculative_generate` at T > 0). A two-sample
chi-square test on the joint 3-token outcomes (rare outcomes pooled) must not reject at alpha = 1e-3 (the
seeds are fixed, so the test is deterministic). Two drafters exercise both verifier paths: one-hot argmax
drafts (how vLLM's EAGLE proposer drafts) and drafts sampled from a different distribution q (accept with
min(1, p/q), else sample max(p - q, 0)). The same test rejects, at the same alpha, a verifier with the classic bug
(resampling p instead of the residual after a rejection): evidence that it has the power to fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from modelopt_ext.acceptance import specdec
from modelopt_ext.acceptance.specdec import Sampling, speculative_generate, warp

pytestmark = pytest.mark.e2e  # ~1.5 min of CPU: 5 x 1500 speculative samples

REPO = Path(__file__).resolve().parents[2]
N, LENGTH, K = 1500, 3, 2
ALPHA = 1e-3


@pytest.fixture(scope="module")
def target():
    from modelopt_ext.targets.tiny import build_tiny_target

    cache = Path(os.environ.get("MODELOPT_EXT_TEST_CACHE", REPO / ".cache"))
    folder = build_tiny_target(cache / "tiny-target")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    # An unknown request: the tiny model hesitates between its answer openings, so 3-token continuations
    # are varied enough for a chi-square test (a known request is answered almost deterministically).
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=True
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return model, [int(i) for i in ids]


class _ContextProposer:
    """Drafts from the target itself (no cache): argmax drafts (q one-hot) or, with `q_temperature`,
    drafts sampled from the target at another temperature (q known, != p)."""

    aux_layer_ids = None

    def __init__(self, model, q_temperature: float | None = None):
        self.model, self.q_temperature = model, q_temperature

    def begin(self, prompt_ids, aux, next_token):
        self.context = [*prompt_ids, next_token]

    def commit(self, new_tokens, aux):
        self.context += new_tokens

    @torch.no_grad()
    def _logits(self, seq):
        return self.model(input_ids=torch.tensor([seq])).logits[0, -1]

    def propose(self, k):
        seq = list(self.context)
        for _ in range(k):
            seq.append(int(self._logits(seq).argmax()))
        return seq[len(self.context) :]

    def propose_sampled(self, k, sampling, generator):
        if self.q_temperature is None:
            return self.propose(k), None
        seq, qs = list(self.context), []
        q_sampling = Sampling(self.q_temperature, sampling.top_p)
        for _ in range(k):
            q = warp(self._logits(seq), q_sampling)
            seq.append(int(torch.multinomial(q, 1, generator=generator)))
            qs.append(q)
        return seq[len(self.context) :], torch.stack(qs)


@torch.no_grad()
def _plain_samples(model, prompt, sampling: Sampling) -> list[tuple[int, ...]]:
    """N sequences sampled from the target alone, in one batch."""
    gen = torch.Generator().manual_seed(1234)
    cache = DynamicCache()
    out = model(input_ids=torch.tensor([prompt] * N), past_key_values=cache, use_cache=True)
    seqs = []
    for _ in range(LENGTH):
        nxt = torch.multinomial(warp(out.logits[:, -1], sampling), 1, generator=gen)
        seqs.append(nxt)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
    return [tuple(r) for r in torch.cat(seqs, 1).tolist()]


def _spec_samples(model, prompt, proposer, sampling: Sampling) -> list[tuple[int, ...]]:
    gen = sampling.generator()
    stats = specdec.DecodeStats()
    outs = [tuple(speculative_generate(model, proposer, prompt, K, LENGTH, (), stats, sampling, gen))
            for _ in range(N)]  # fmt: skip
    accepted = sum(stats.accepted_per_pos) / max(stats.rounds, 1)
    print(
        f"  {type(proposer).__name__} q_T={proposer.q_temperature}: {accepted:.2f} drafts accepted per round"
    )
    assert 0.05 < accepted < K  # both the accept and the reject paths ran
    return outs


def chi_square_p(a: list, b: list, min_expected: float = 5.0) -> tuple[float, int]:
    """Two-sample chi-square test of equal distributions (outcomes with fewer than `min_expected` expected
    counts in either sample pooled into one cell): (p-value, degrees of freedom)."""
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    cells, rest = [], [0, 0]
    for key in set(ca) | set(cb):
        x, y = ca[key], cb[key]
        if (x + y) * min(na, nb) / (na + nb) >= min_expected:
            cells.append((x, y))
        else:
            rest[0] += x
            rest[1] += y
    if sum(rest):
        cells.append(tuple(rest))
    k1, k2 = (nb / na) ** 0.5, (na / nb) ** 0.5
    chi2 = sum((k1 * x - k2 * y) ** 2 / (x + y) for x, y in cells)
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(chi2 / 2.0))), df


@pytest.mark.parametrize(
    ("temperature", "top_p", "q_temperature"),
    [(1.0, 1.0, None), (0.8, 0.9, None), (1.0, 1.0, 2.0), (0.8, 0.9, 1.6)],
    ids=["T1-onehot", "T0.8-topp0.9-onehot", "T1-sampled-q", "T0.8-topp0.9-sampled-q"],
)
def test_speculative_sampling_keeps_the_target_distribution(target, temperature, top_p, q_temperature):
    model, prompt = target
    sampling = Sampling(temperature, top_p, seed=7)
    plain = _plain_samples(model, prompt, sampling)
    spec = _spec_samples(model, prompt, _ContextProposer(model, q_temperature), sampling)
    p, df = chi_square_p(plain, spec)
    print(f"  T={temperature} top-p={top_p}: chi-square p = {p:.3g} ({df} df, {len(set(plain))} outcomes)")
    assert df >= 5  # enough distinct outcomes for the test to mean something
    assert p > ALPHA


def test_the_chi_square_test_catches_a_wrong_verifier(target, monkeypatch):
    """Resampling p (not the residual max(p - q, 0)) after a rejection over-weights the drafts."""
    model, prompt = target

    def wrong(p, drafts, q, generator):
        for i, d in enumerate(drafts):
            qd = 1.0 if q is None else float(q[i, d])
            if float(torch.rand((), generator=generator)) < min(1.0, float(p[i, d]) / qd):
                continue
            return i, int(torch.multinomial(p[i], 1, generator=generator))
        return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))

    monkeypatch.setattr(specdec, "verify_sampled", wrong)
    sampling = Sampling(1.0, 1.0, seed=7)
    plain = _plain_samples(model, prompt, sampling)
    spec = _spec_samples(model, prompt, _ContextProposer(model), sampling)
    p, df = chi_square_p(plain, spec)
    print(f"  wrong verifier: chi-square p = {p:.3g} ({df} df)")
    assert p < ALPHA  # rejected at the alpha the correct verifier passes
