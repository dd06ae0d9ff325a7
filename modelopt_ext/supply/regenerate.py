"""Regenerate the assistant turns of a conversations file with the target itself, through OpenAI-compatible servers.

`regenerate(...)` is the library; the command is `python -m modelopt_ext.regenerate` (modelopt_ext/regenerate.py).

Each conversation keeps its system and user turns; every assistant turn is replaced, in order, by what the
target answers to the conversation so far (earlier turns already regenerated), so the drafter later learns the
target's own distribution. Requests go to `POST /v1/chat/completions` of the servers (vLLM's OpenAI server)
round-robin over the healthy ones (`ServerPool`: circuit breakers, failover to another server, bounded retries);
it lives beside the other server clients in supply/ for that reason.
A reasoning parser's `reasoning_content` is kept in the message under that key (what thinking-format chat
templates such as Qwen3's render); `--thinking drop` leaves it out.

Output: one line per input conversation, in input order, in the input's own keys (`messages` or `conversations`,
other keys such as ids kept). Work is done in parts of `--part-size` conversations, each written atomically
to `OUT.parts/`; a restarted run skips finished parts; the output file is assembled (temp + rename) when all parts
exist. A conversation that fails on every server `--max-attempts` times is kept as it was and counted as a
failure (never dropped, never duplicated). Progress every 5 s (rate, tokens/s, ETA) and a summary at the end.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from modelopt_ext.data.conversations import parse_conversation
from modelopt_ext.supply.server_pool import BreakerPolicy, NoHealthyServerError, ServerPool
from modelopt_ext.util.fileio import write_json_atomic, write_text_atomic


class RegenError(RuntimeError):
    """A conversation or the run failed; one line saying why."""


class NoServerError(RegenError):
    """No server in rotation for longer than the allowed wait: the run stops (finished parts are kept)."""


@dataclass
class GenOptions:
    """Sampling and retry settings."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 1024
    thinking: str = "keep"  # keep | drop: a reasoning parser's reasoning_content
    max_attempts: int = 6  # per assistant turn, over all servers
    timeout_s: float = 600.0
    backoff_s: float = 0.2


@dataclass
class Stats:
    """Counters of one run (this process)."""

    conversations: int = 0
    turns: int = 0
    tokens: int = 0
    hit_max_tokens: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, tokens: int, hit_max: bool) -> None:
        with self.lock:
            self.turns += 1
            self.tokens += tokens
            self.hit_max_tokens += int(hit_max)


class ChatClient:
    """chat/completions over a server pool (thread-safe): round-robin, failover, bounded retries."""

    def __init__(
        self, urls: Sequence[str], model: str | None, opts: GenOptions, policy: BreakerPolicy | None = None
    ):
        self.urls = [u.rstrip("/") for u in urls]
        if not self.urls:
            raise RegenError("no server URLs given (--servers)")
        self.pool = ServerPool(self.urls, policy=policy or BreakerPolicy())
        self.http = httpx.Client(timeout=httpx.Timeout(opts.timeout_s, connect=10.0), trust_env=False)
        self.opts = opts
        self.model = model
        self._model_lock = threading.Lock()
        self._down_since: float | None = None  # when the last healthy server left rotation
        self._down_timeout_s = (policy or BreakerPolicy()).all_down_timeout_s

    def _check_down(self, last: str) -> None:
        """Stop the run once no server has answered for all_down_timeout_s (half-open probes keep failing)."""
        with self._model_lock:
            now = time.monotonic()
            self._down_since = self._down_since or now
            if now - self._down_since < self._down_timeout_s:
                return
        raise NoServerError(
            f"no healthy server for {self._down_timeout_s:.0f}s (last error {last}); finished parts are kept: "
            "rerun to continue"
        )

    def _model_name(self, url: str) -> str:
        with self._model_lock:
            if self.model is None:
                r = self.http.get(f"{url}/v1/models")
                r.raise_for_status()
                self.model = r.json()["data"][0]["id"]
            return self.model

    def complete(self, messages: list[dict]) -> tuple[dict, int, bool]:
        """(assistant message, completion tokens, hit max tokens) for `messages`; RegenError after the retries."""
        tried: list[str] = []
        last = ""
        attempt = 0
        while attempt < self.opts.max_attempts:
            url = self.pool.acquire(avoid=set(tried))
            if url is None:
                # Waiting for a server to come back is not an attempt; the pool ends it after all_down_timeout_s.
                try:
                    self.pool.check_all_down_timeout()
                except NoHealthyServerError as e:
                    raise NoServerError(f"{e}; finished parts are kept: rerun to continue") from None
                time.sleep(min(max(self.pool.seconds_until_available(), 0.05), 1.0))
                tried = []
                continue
            t0 = time.monotonic()
            try:
                body = {
                    "model": self._model_name(url),
                    "messages": messages,
                    "temperature": self.opts.temperature,
                    "top_p": self.opts.top_p,
                    "max_tokens": self.opts.max_tokens,
                }
                r = self.http.post(f"{url}/v1/chat/completions", json=body)
                if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    # The request, not the server (e.g. a prompt over the context length): no health penalty.
                    self.pool.release(url)
                    attempt += 1
                    last = f"{url}: HTTP {r.status_code}: {r.text[:200]}"
                    tried.append(url)
                    continue
                if r.status_code >= 400:
                    raise httpx.HTTPStatusError(
                        f"HTTP {r.status_code}: {r.text[:200]}", request=r.request, response=r
                    )
                data = r.json()
                choice = data["choices"][0]
                msg = choice["message"]
                text = msg.get("content") or ""
                out = {"role": "assistant", "content": text}
                reasoning = msg.get("reasoning_content") or msg.get("reasoning")
                if reasoning and self.opts.thinking == "keep":
                    out["reasoning_content"] = reasoning
                tokens = int((data.get("usage") or {}).get("completion_tokens", 0))
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
                last = f"{url}: {type(e).__name__}: {e}"
                self.pool.record_failure(url, last, time.monotonic() - t0)
                tried.append(url)
                # While no server is healthy, failed probes are the all-down timer's business, not this turn's.
                if self.pool.healthy():
                    attempt += 1
                else:
                    self._check_down(last)
                if len(set(tried)) >= len(self.urls):
                    tried = []  # every server failed this turn once: retry them, after a pause
                    time.sleep(self.opts.backoff_s * max(attempt, 1))
                continue
            self.pool.record_success(url, time.monotonic() - t0, len(r.content))
            with self._model_lock:
                self._down_since = None
            return out, tokens, choice.get("finish_reason") == "length"
        raise RegenError(f"failed {self.opts.max_attempts} times; last: {last}")

    def close(self) -> None:
        self.http.close()


def regenerate_one(row: dict, client: ChatClient, stats: Stats) -> dict:
    """The row with its assistant turns regenerated (input keys and other fields kept)."""
    messages = parse_conversation(row)
    new: list[dict] = []
    for m in messages:
        if m["role"] != "assistant":
            new.append(m)
            continue
        # History sent back without reasoning: what chat templates render for earlier turns.
        history = [{"role": x["role"], "content": x["content"]} for x in new]
        msg, tokens, hit = client.complete(history)
        stats.add(tokens, hit)
        new.append(msg)
    out = dict(row)
    if "messages" in row:
        out["messages"] = new
    else:
        back = {"system": "system", "user": "human", "assistant": "gpt"}
        out["conversations"] = [
            {
                "from": back[m["role"]],
                "value": m["content"],
                **({"reasoning_content": m["reasoning_content"]} if "reasoning_content" in m else {}),
            }
            for m in new
        ]
    return out


def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def regenerate(
    data: str | Path,
    out: str | Path,
    servers: Sequence[str],
    *,
    opts: GenOptions | None = None,
    model: str | None = None,
    concurrency: int = 8,
    part_size: int = 64,
    log: Callable[[str], None] = lambda m: print(m, flush=True),
    policy: BreakerPolicy | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Regenerate `data` into `out` (module docstring). Returns the summary dict (also OUT.summary.json)."""
    opts = opts or GenOptions()
    data, out = Path(data), Path(out)
    try:
        lines = [ln for ln in data.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as e:
        raise RegenError(f"{data}: cannot read ({e.strerror})") from None
    rows = []
    for n, ln in enumerate(lines, 1):
        try:
            row = json.loads(ln)
            parse_conversation(row)
        except ValueError as e:
            raise RegenError(f"{data}: line {n}: {e}") from None
        rows.append(row)
    parts_dir = out.with_name(out.name + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(rows), part_size))
    # Several nodes share the parts (node r does r, r + W, ...); whoever finds them all assembles the output.
    todo = [s for s in starts[rank::world_size] if not (parts_dir / f"part-{s:09d}.jsonl").is_file()]
    log(
        f"regenerate: {len(rows)} conversations of {data} -> {out}; {len(servers)} server(s), temperature "
        f"{opts.temperature}, top_p {opts.top_p}, max_tokens {opts.max_tokens}; {len(starts) - len(todo)} of "
        f"{len(starts)} parts already done"
    )
    client = ChatClient(servers, model, opts, policy)
    stats = Stats()
    t0 = last = time.monotonic()
    todo_n = sum(min(s + part_size, len(rows)) - s for s in todo)

    def one(i: int) -> str:
        try:
            new = regenerate_one(rows[i], client, stats)
        except NoServerError:
            raise
        except RegenError as e:
            with stats.lock:
                stats.failures.append(f"conversation {i + 1}: {e}")
            new = rows[i]  # kept as it was: never dropped
        with stats.lock:
            stats.conversations += 1
        return json.dumps(new, ensure_ascii=False)

    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as ex:
            for s in todo:
                lines_out = list(ex.map(one, range(s, min(s + part_size, len(rows)))))
                write_text_atomic(parts_dir / f"part-{s:09d}.jsonl", "\n".join(lines_out) + "\n")
                now = time.monotonic()
                if now - last >= 5.0 or s == todo[-1]:
                    rate = stats.conversations / max(now - t0, 1e-9)
                    eta = (todo_n - stats.conversations) / rate if rate else 0.0
                    log(
                        f"regenerate: {stats.conversations}/{todo_n} conversations, {rate:.2f}/s, "
                        f"{stats.tokens / max(now - t0, 1e-9):.0f} tokens/s, ETA {_fmt_s(eta)}"
                    )
                    last = now
    finally:
        client.close()
    missing = [s for s in starts if not (parts_dir / f"part-{s:09d}.jsonl").is_file()]
    if not missing:
        text = "".join((parts_dir / f"part-{s:09d}.jsonl").read_text(encoding="utf-8") for s in starts)
        write_text_atomic(out, text)
    else:
        log(
            f"regenerate: rank {rank} done; {len(missing)} parts of other ranks still missing (they assemble {out})"
        )
    summary = {
        "complete": not missing,
        "conversations": len(rows),
        "regenerated_now": stats.conversations,
        "assistant_turns": stats.turns,
        "tokens": stats.tokens,
        "mean_tokens_per_turn": stats.tokens / max(stats.turns, 1),
        "hit_max_tokens": stats.hit_max_tokens,
        "failures": len(stats.failures),
        "failure_examples": stats.failures[:5],
        "seconds": time.monotonic() - t0,
        "servers": client.pool.states(),
    }
    write_json_atomic(out.with_name(out.name + ".summary.json"), summary)
    log(
        f"regenerate: {'done' if not missing else 'rank ' + str(rank) + ' done'}: {len(rows)} conversations in {out} ({stats.conversations} this run, "
        f"{stats.turns} assistant turns, {stats.tokens} tokens, mean {summary['mean_tokens_per_turn']:.1f} "
        f"tokens/turn, {stats.hit_max_tokens} hit max_tokens, {len(stats.failures)} failed and kept as they "
        f"were) in {_fmt_s(summary['seconds'])}"
    )
    for f in stats.failures[:5]:
        log(f"regenerate: failure: {f}")
    return summary
