"""Greedy chain speculative decoding with a transformers target verifying: acceptance length and speed.

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
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers import DynamicCache

from modelopt_ext.models.eagle3 import DraftCache, Eagle3DraftModel
from modelopt_ext.supervision.colocated import forward_with_aux


class Proposer(Protocol):
    """What the decoding loop needs from a drafter."""

    aux_layer_ids: list[int] | None  # target layers to capture (None: the proposer needs none)

    def begin(self, prompt_ids: list[int], aux: torch.Tensor | None, next_token: int) -> None:
        """After prefill: the prompt, its aux states [1, n, ..] and the target's first greedy token."""

    def propose(self, k: int) -> list[int]:
        """k draft tokens (target ids) continuing the verified sequence."""

    def commit(self, new_tokens: list[int], aux: torch.Tensor | None) -> None:
        """The verified round: tokens appended (accepted drafts + the target's token) and the aux states
        of the positions that were verified (x_n, d_1..d_a) [1, a+1, ..]."""


class Eagle3Proposer:
    """Drafts with an EAGLE-3 head the way vLLM runs it (cached step-0 keys + a per-round chain)."""

    def __init__(self, draft: Eagle3DraftModel):
        self.draft = draft.eval()
        self.aux_layer_ids = list(draft.config.aux_layer_ids)
        self.device = next(draft.parameters()).device

    @torch.no_grad()
    def begin(self, prompt_ids, aux, next_token):
        self.cache = DraftCache()
        ids = torch.tensor([list(prompt_ids[1:]) + [next_token]], device=self.device)
        self.pending = self.draft.extend(self.cache, ids, aux.to(self.device))
        self.last_pos = len(prompt_ids) - 1

    @torch.no_grad()
    def propose(self, k):
        logits, hidden = self.pending
        chain = DraftCache()
        tok = self.draft.draft_to_target(logits[:, -1].argmax(-1, keepdim=True))
        drafts = [int(tok)]
        for j in range(1, k):
            logits, hidden = self.draft.chain_step(self.cache, chain, tok, hidden, self.last_pos + j)
            tok = self.draft.draft_to_target(logits[:, -1].argmax(-1, keepdim=True))
            drafts.append(int(tok))
        return drafts

    @torch.no_grad()
    def commit(self, new_tokens, aux):
        ids = torch.tensor([new_tokens], device=self.device)
        self.pending = self.draft.extend(self.cache, ids, aux.to(self.device))
        self.last_pos += len(new_tokens)


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
def greedy_generate(target: nn.Module, prompt_ids: list[int], max_new_tokens: int, eos_ids=()) -> list[int]:
    """The target's own greedy continuation (KV cache, one token per forward)."""
    dev = next(target.parameters()).device
    cache = DynamicCache()
    out = target(input_ids=torch.tensor([prompt_ids], device=dev), past_key_values=cache, use_cache=True)
    tokens: list[int] = []
    while True:
        tok = int(out.logits[0, -1].argmax())
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
) -> list[int]:
    """Greedy chain speculative decoding (module docstring); returns the new tokens."""
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
    nxt = int(out.logits[0, -1].argmax())
    tokens = [nxt]
    proposer.begin(list(prompt_ids), aux, nxt)
    n = len(prompt_ids)  # tokens in the target cache; x_n = nxt is not in it yet
    while len(tokens) < max_new_tokens and nxt not in eos_ids:
        drafts = proposer.propose(num_steps)
        out, aux = run([nxt, *drafts])
        greedy = out.logits[0].argmax(-1).tolist()  # greedy[i] follows d_i (greedy[0] follows x_n)
        a = 0
        while a < num_steps and drafts[a] == greedy[a]:
            a += 1
        new = drafts[:a] + [greedy[a]]
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
    outputs_match_greedy: bool
    mismatched_prompts: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def run_benchmark(
    target: nn.Module,
    proposer: Proposer,
    prompts: list[list[int]],
    num_steps: int = 3,
    max_new_tokens: int = 64,
    eos_ids=(),
) -> tuple[BenchResult, list[list[int]]]:
    """Decode every prompt greedily with and without the drafter; (result, speculative outputs)."""
    target.eval()
    stats = DecodeStats(accepted_per_pos=[0] * num_steps)
    spec_out, base_out = [], []
    t0 = time.perf_counter()
    for p in prompts:
        spec_out.append(speculative_generate(target, proposer, p, num_steps, max_new_tokens, eos_ids, stats))
    t_spec = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in prompts:
        base_out.append(greedy_generate(target, p, max_new_tokens, eos_ids))
    t_base = time.perf_counter() - t0
    n_tok = sum(len(o) for o in spec_out)
    rounds = max(stats.rounds, 1)
    mismatched = [i for i, (a, b) in enumerate(zip(spec_out, base_out)) if a != b]
    tps_spec = n_tok / t_spec if t_spec > 0 else 0.0
    tps_base = sum(len(o) for o in base_out) / t_base if t_base > 0 else 0.0
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
        outputs_match_greedy=not mismatched,
        mismatched_prompts=mismatched,
    )
    return result, spec_out
