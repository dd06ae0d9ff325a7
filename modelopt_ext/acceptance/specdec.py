"""Chain speculative decoding with a transformers target verifying: acceptance length, speed, quality.

One round, with n tokens verified so far and x_n the target's latest greedy token:
  1. the drafter proposes d_1..d_k (a chain: each draft feeds the next);
  2. the target runs [x_n, d_1..d_k] at positions n..n+k on its KV cache; g_i = its argmax after d_{i-1};
  3. the longest prefix with d_i == g_i is accepted (a tokens), g_{a+1} is the target's own next token:
     a+1 tokens per round; the target's KV cache is cropped to the verified tokens;
  4. the drafter commits the verified positions: pairs (token p+1, target aux states at p), p = n..n+a.
The output is the target's greedy output by construction (every emitted token is a target argmax),
and `run_benchmark` checks it against a plain greedy loop on the same target.

Acceptance length = mean tokens per round (a+1), = 1 + accepted drafts / rounds (vLLM's definition);
acceptance at draft position i = fraction of rounds whose i-th draft was accepted.

At temperature T > 0 step 3 is rejection sampling, as vLLM's and SGLang's verifiers do it: with p_i the
target's distribution after d_{i-1} (temperature and top-p applied) and q_i the drafter's, d_i is accepted
with probability min(1, p_i(d_i) / q_i(d_i)); the first rejected position emits a sample of
norm(max(p_i - q_i, 0)), and a fully accepted chain emits a sample of p_{k+1}. A drafter that proposes its
argmax (how vLLM's EAGLE proposer drafts) has a one-hot q: accept with probability p_i(d_i), else sample p_i
with d_i removed. Either way every emitted token is distributed as plain sampling from the target would
give it (tests/model/test_specdec_sampling.py checks this with a chi-square test).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers import DynamicCache

from modelopt_ext.supply.colocated import forward_with_aux


class Proposer(Protocol):
    """What the decoding loop needs from a drafter (any kind: the loop never looks inside it).

    A proposer may also offer `propose_sampled(k, sampling, generator) -> (drafts, q)` with q [k, V] the
    target-vocabulary distributions the drafts were sampled from; without it, drafts at T > 0 are taken
    as deterministic (one-hot q), as vLLM treats its EAGLE proposer's argmax drafts.
    """

    aux_layer_ids: list[int] | None  # target layers to capture (None: the proposer needs none)

    def begin(self, prompt_ids: list[int], aux: torch.Tensor | None, next_token: int) -> None:
        """After prefill: the prompt, its aux states [1, n, ..] and the target's first greedy token."""

    def propose(self, k: int) -> list[int]:
        """k draft tokens (target ids) continuing the verified sequence."""

    def commit(self, new_tokens: list[int], aux: torch.Tensor | None) -> None:
        """The verified round: tokens appended (accepted drafts + the target's token) and the aux states
        of the positions that were verified (x_n, d_1..d_a) [1, a+1, ..]."""


class OracleProposer:
    """Proposes a known continuation (e.g. the target's own greedy output): the perfect drafter."""

    aux_layer_ids = None

    def __init__(self, continuation: list[int]):
        self.continuation = list(continuation)

    def begin(self, prompt_ids, aux, next_token):
        self.done = 1  # the first greedy token came from prefill

    def propose(self, k):
        out = self.continuation[self.done : self.done + k]
        return out + [0] * (k - len(out))

    def commit(self, new_tokens, aux):
        self.done += len(new_tokens)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one measurement; temperature 0 is greedy (top_p then plays no part)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


GREEDY = Sampling()


def warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Probabilities [.., V] (fp32) after temperature and top-p, as the engines' samplers compute them:
    the smallest set of most likely tokens whose mass reaches top_p is kept (the top token always)."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_sampled(
    p: torch.Tensor, drafts: list[int], q: torch.Tensor | None, generator: torch.Generator
) -> tuple[int, int]:
    """Rejection sampling of a chain (module docstring): p [k+1, V] target probabilities, q [k, V] the
    drafter's (None: one-hot drafts). Returns (accepted drafts a, the token emitted after them)."""
    for i, d in enumerate(drafts):
        pd = float(p[i, d])
        qd = 1.0 if q is None else float(q[i, d])
        u = float(torch.rand((), generator=generator, device=generator.device))
        if qd > 0.0 and u < min(1.0, pd / qd):
            continue
        if q is None:
            resid = p[i].clone()
            resid[d] = 0.0
        else:
            resid = (p[i] - q[i]).clamp_min(0.0)
        if float(resid.sum()) <= 0.0:  # p == q up to rounding: any p sample is correct
            resid = p[i]
        return i, _sample(resid / resid.sum(), generator)
    return len(drafts), _sample(p[len(drafts)], generator)


@dataclass
class DecodeStats:
    rounds: int = 0
    tokens_from_rounds: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)


def _crop(cache: DynamicCache, keep: int) -> None:
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def greedy_generate(
    target: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_ids=(),
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The target's own continuation (KV cache, one token per forward): greedy, or sampled with `sampling`."""
    dev = next(target.parameters()).device
    cache = DynamicCache()
    out = target(input_ids=torch.tensor([prompt_ids], device=dev), past_key_values=cache, use_cache=True)
    tokens: list[int] = []
    while True:
        last = out.logits[0, -1]
        tok = int(last.argmax()) if sampling.greedy else _sample(warp(last, sampling), generator)
        tokens.append(tok)
        if len(tokens) >= max_new_tokens or tok in eos_ids:
            return tokens
        out = target(input_ids=torch.tensor([[tok]], device=dev), past_key_values=cache, use_cache=True)


@torch.no_grad()
def speculative_generate(
    target: nn.Module,
    proposer: Proposer,
    prompt_ids: list[int],
    num_steps: int,
    max_new_tokens: int,
    eos_ids=(),
    stats: DecodeStats | None = None,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Chain speculative decoding (module docstring): greedy, or rejection sampling at `sampling`'s
    temperature (draws from `generator`); returns the new tokens."""
    stats = stats if stats is not None else DecodeStats()
    if len(stats.accepted_per_pos) < num_steps:
        stats.accepted_per_pos += [0] * (num_steps - len(stats.accepted_per_pos))
    dev = next(target.parameters()).device
    ids = proposer.aux_layer_ids or []
    cache = DynamicCache()

    def run(tokens: list[int]):
        kw = {"input_ids": torch.tensor([tokens], device=dev), "past_key_values": cache, "use_cache": True}
        if ids:
            return forward_with_aux(target, ids, **kw)
        return target(**kw), None

    out, aux = run(list(prompt_ids))
    last = out.logits[0, -1]
    nxt = int(last.argmax()) if sampling.greedy else _sample(warp(last, sampling), generator)
    tokens = [nxt]
    proposer.begin(list(prompt_ids), aux, nxt)
    n = len(prompt_ids)  # tokens in the target cache; x_n = nxt is not in it yet
    while len(tokens) < max_new_tokens and nxt not in eos_ids:
        sampled = None if sampling.greedy else getattr(proposer, "propose_sampled", None)
        q = None
        if sampled is not None:
            drafts, q = sampled(num_steps, sampling, generator)
        else:
            drafts = proposer.propose(num_steps)
        out, aux = run([nxt, *drafts])
        if sampling.greedy:
            greedy = out.logits[0].argmax(-1).tolist()  # greedy[i] follows d_i (greedy[0] follows x_n)
            a = 0
            while a < num_steps and drafts[a] == greedy[a]:
                a += 1
            new = drafts[:a] + [greedy[a]]
        else:
            a, tok = verify_sampled(warp(out.logits[0], sampling), drafts, q, generator)
            new = drafts[:a] + [tok]
        stats.rounds += 1
        stats.tokens_from_rounds += a + 1
        for i in range(a):
            stats.accepted_per_pos[i] += 1
        _crop(cache, n + a + 1)  # keep x_n and the accepted drafts; g_{a+1} is fed next round
        eos_at = next((i for i, t in enumerate(new) if t in eos_ids), None)
        if eos_at is not None:
            new = new[: eos_at + 1]
        tokens += new
        n += a + 1
        nxt = new[-1]
        if eos_at is None and len(tokens) < max_new_tokens:
            proposer.commit(new, None if aux is None else aux[:, : a + 1])
    return tokens[:max_new_tokens]


def repeated_ngram_fraction(outputs: list[list[int]], n: int = 4) -> float:
    """Share of the n-grams of each output that already occurred earlier in the same output (pooled).

    Degenerate, looping text is easy to draft, so a high figure flags an acceptance length that the
    output's repetitiveness inflates."""
    total = repeated = 0
    for out in outputs:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(out) - n + 1):
            gram = tuple(out[i : i + n])
            total += 1
            if gram in seen:
                repeated += 1
            else:
                seen.add(gram)
    return repeated / total if total else 0.0


@dataclass
class BenchResult:
    """What `run_benchmark` measured (JSON-ready via `to_dict`)."""

    num_prompts: int
    num_steps: int
    max_new_tokens: int
    mean_acceptance_length: float
    acceptance_per_position: list[float]
    rounds: int
    generated_tokens: int
    tokens_per_s_speculative: float
    tokens_per_s_baseline: float
    speedup: float
    outputs_match_greedy: bool | None  # None at T > 0, where outputs are samples (checked statistically)
    mismatched_prompts: list[int]
    temperature: float = 0.0
    top_p: float = 1.0
    repeated_4gram_fraction: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Baseline:
    """The target decoding alone: outputs and the seconds it took (shared by the runs of a sweep)."""

    outputs: list[list[int]]
    seconds: float


def run_baseline(
    target: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_ids=(), sampling: Sampling = GREEDY
) -> Baseline:
    """Decode every prompt with the target alone (greedy, or sampled with its own seeded generator)."""
    gen = None if sampling.greedy else sampling.generator(next(target.parameters()).device)
    t0 = time.perf_counter()
    outs = [greedy_generate(target, p, max_new_tokens, eos_ids, sampling, gen) for p in prompts]
    return Baseline(outs, time.perf_counter() - t0)


def run_benchmark(
    target: nn.Module,
    proposer: Proposer,
    prompts: list[list[int]],
    num_steps: int = 3,
    max_new_tokens: int = 64,
    eos_ids=(),
    sampling: Sampling = GREEDY,
    baseline: Baseline | None = None,
) -> tuple[BenchResult, list[list[int]]]:
    """Decode every prompt with and without the drafter; (result, speculative outputs).

    Greedy: the speculative outputs must equal the target's own (`outputs_match_greedy`). Sampled: they
    are samples, so only acceptance and speed are reported. `baseline` reuses an earlier target-alone run
    with the same prompts and settings (a chain-length sweep times the target once)."""
    target.eval()
    gen = None if sampling.greedy else sampling.generator(next(target.parameters()).device)
    stats = DecodeStats(accepted_per_pos=[0] * num_steps)
    spec_out = []
    t0 = time.perf_counter()
    for p in prompts:
        spec_out.append(
            speculative_generate(
                target, proposer, p, num_steps, max_new_tokens, eos_ids, stats, sampling, gen
            )
        )
    t_spec = time.perf_counter() - t0
    base = baseline or run_baseline(target, prompts, max_new_tokens, eos_ids, sampling)
    n_tok = sum(len(o) for o in spec_out)
    rounds = max(stats.rounds, 1)
    mismatched = (
        [i for i, (a, b) in enumerate(zip(spec_out, base.outputs)) if a != b] if sampling.greedy else []
    )
    tps_spec = n_tok / t_spec if t_spec > 0 else 0.0
    tps_base = sum(len(o) for o in base.outputs) / base.seconds if base.seconds > 0 else 0.0
    result = BenchResult(
        num_prompts=len(prompts),
        num_steps=num_steps,
        max_new_tokens=max_new_tokens,
        mean_acceptance_length=stats.tokens_from_rounds / rounds,
        acceptance_per_position=[c / rounds for c in stats.accepted_per_pos],
        rounds=stats.rounds,
        generated_tokens=n_tok,
        tokens_per_s_speculative=tps_spec,
        tokens_per_s_baseline=tps_base,
        speedup=tps_spec / tps_base if tps_base else 0.0,
        outputs_match_greedy=(not mismatched) if sampling.greedy else None,
        mismatched_prompts=mismatched,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        repeated_4gram_fraction=repeated_ngram_fraction(spec_out),
    )
    return result, spec_out


def sweep_chain_length(
    target: nn.Module,
    proposer: Proposer,
    prompts: list[list[int]],
    max_steps: int,
    max_new_tokens: int = 64,
    eos_ids=(),
    sampling: Sampling = GREEDY,
    progress=None,
) -> list[BenchResult]:
    """`run_benchmark` for k = 1..max_steps against one target-alone run (so users pick k from data)."""
    base = run_baseline(target, prompts, max_new_tokens, eos_ids, sampling)
    results = []
    for k in range(1, max_steps + 1):
        r, _ = run_benchmark(target, proposer, prompts, k, max_new_tokens, eos_ids, sampling, base)
        results.append(r)
        if progress is not None:
            progress(r)
    return results
