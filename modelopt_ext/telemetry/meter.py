"""Where the trainer's time goes, and what the supervision supply delivers (counted per rank, summed over ranks).

A step's wall time splits into:
- data wait: blocked in `next(loader)` (the DataLoader, and with `data.mode: streaming` the fetches from the
  hidden-state servers that its workers have not finished yet), plus the source call when the source fetches
  over the network (`data.mode: remote`): the trainer idles while supply is late;
- supply: the source call when it computes in this process (`colocated`: the target's forward pass) - busy, not
  starved, but time the drafter does not train;
- peer wait: the gradient all-reduce, where a rank whose data came in time waits for the ranks whose data did
  not (and for the transfer itself). Without it a starved multi-rank job looks fed: a starved peer's wait shows
  up on every other rank as collective time, not data wait;
- the rest: the drafter's forward/backward, the optimizer, other collectives, checkpoints.

Start-up - from creating the loader's iterator to its first batch (starting DataLoader workers, filling the
fetch pipeline), once per pass over the data - is counted apart (`startup_s`) and left out of the fractions:
it is a fixed cost per epoch, not a sign that supply is short, and would dominate a short run.

Per server: requests, errors, summed latency, bytes, outage events (the streaming dataset's shared counters,
which its DataLoader workers fill; or, for a remote source, timed here around each call) and a latency
histogram (telemetry/latency.py) for p50/p95. Every rank keeps cumulative totals; `aggregate` sums them over
ranks with ONE all-reduce of a flat vector (called at log lines only), and differences of two aggregates give
the figures of a window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from modelopt_ext.telemetry.latency import N_BINS, LatencyHistogram, percentile

SERVER_FIELDS = ("requests", "errors", "latency_s", "bytes", "down_events")
_RUN_FIELDS = ("wall_s", "wait_s", "startup_s", "supply_s", "sync_s", "sup_bytes", "samples", "tokens")

# How a source's call counts: 'remote' (network fetch: data wait), 'in_process' (target forward here: supply),
# 'prefetched' (the dataset fetched already; the call only relabels tensors: counted as data wait, ~0).
# Each source says which with a `telemetry_kind` attribute (a remote source also has `url`, the server of its
# last call; a prefetched one's dataset has `server_stats()`).
REMOTE, IN_PROCESS, PREFETCHED = "remote", "in_process", "prefetched"
KINDS = (REMOTE, IN_PROCESS, PREFETCHED)


def classify_source(source: Any) -> str:
    """How the trainer's time in `source(batch)` counts: the source's own `telemetry_kind`.

    A source that declares none (a plain callable, e.g. a test's) runs in this process: in_process. A
    declared kind outside KINDS is a programming error and raises ValueError naming it.
    """
    kind = getattr(source, "telemetry_kind", IN_PROCESS)
    if kind not in KINDS:
        raise ValueError(f"{type(source).__name__}.telemetry_kind = {kind!r}; expected one of {list(KINDS)}")
    return kind


@dataclass
class Totals:
    """Cumulative (or windowed) counts summed over ranks. Times are summed over ranks too (`ranks` of them)."""

    ranks: int = 1
    wall_s: float = 0.0
    wait_s: float = 0.0
    startup_s: float = 0.0  # waiting for the first batch of each pass over the loader (not in the fractions)
    supply_s: float = 0.0
    sync_s: float = 0.0  # in the gradient all-reduce (waiting for peers, and the transfer)
    sup_bytes: float = 0.0  # bytes of the Supervision batches the trainer received (padding included)
    samples: float = 0.0
    tokens: float = 0.0
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)  # url -> SERVER_FIELDS + "hist"

    def minus(self, other: Totals | None) -> Totals:
        """The counts since `other` (an earlier aggregate); self when other is None."""
        if other is None:
            return self
        servers = {}
        for url, s in self.servers.items():
            o = other.servers.get(url)
            if o is None:
                servers[url] = s
                continue
            d = {k: s[k] - o[k] for k in SERVER_FIELDS}
            d["hist"] = [a - b for a, b in zip(s["hist"], o["hist"])]
            servers[url] = d
        return Totals(
            ranks=self.ranks,
            **{k: getattr(self, k) - getattr(other, k) for k in _RUN_FIELDS},
            servers=servers,
        )

    # -- derived figures --------------------------------------------------------------------------------
    @property
    def mean_wall_s(self) -> float:
        """Wall time of one rank (ranks run side by side)."""
        return self.wall_s / max(self.ranks, 1)

    @property
    def steady_s(self) -> float:
        """Trainer time (summed over ranks) after start-up."""
        return self.wall_s - self.startup_s

    @property
    def data_wait_frac(self) -> float:
        """Share of the trainers' (steady) time blocked waiting for the next batch / its supervision."""
        return self.wait_s / self.steady_s if self.steady_s > 0 else float("nan")

    @property
    def supply_frac(self) -> float:
        """Share of the trainers' (steady) time producing supervision in-process (colocated target forward)."""
        return self.supply_s / self.steady_s if self.steady_s > 0 else float("nan")

    @property
    def hs_bytes(self) -> float:
        """Hidden-state bytes received: the servers' payload bytes when they are counted, else the batches'."""
        server_bytes = sum(s["bytes"] for s in self.servers.values())
        return server_bytes if server_bytes > 0 else self.sup_bytes

    def rate(self, amount: float) -> float:
        """amount per second of (one rank's) wall time."""
        w = self.mean_wall_s
        return amount / w if w > 0 else float("nan")

    @property
    def sync_frac(self) -> float:
        """Share of the trainers' (steady) time in the gradient all-reduce: mostly waiting for slower peers."""
        return self.sync_s / self.steady_s if self.steady_s > 0 else float("nan")

    def supply_tokens_per_s(self) -> float:
        """Tokens/s the supply delivered to the trainers (per second of steady time)."""
        steady = self.steady_s / max(self.ranks, 1)
        return self.tokens / steady if steady > 0 else float("nan")

    def demand_tokens_per_s(self) -> float:
        """Tokens/s the trainers could consume if supply were instant: their steady time minus the data wait and
        the all-reduce (where a fed rank waits for a starved peer; its transfer share makes this a slight
        overestimate, the safe side for sizing)."""
        busy = (self.steady_s - self.wait_s - self.sync_s) / max(self.ranks, 1)
        return self.tokens / busy if busy > 0 else float("nan")

    def server_summary(self) -> dict[str, dict[str, float]]:
        """url -> requests, errors, down_events, lat_mean_ms, lat_p50_ms, lat_p95_ms, mb."""
        out = {}
        for url, s in self.servers.items():
            req = s["requests"]
            out[url] = {
                "requests": int(req),
                "errors": int(s["errors"]),
                "down_events": int(s["down_events"]),
                "lat_mean_ms": 1000 * s["latency_s"] / req if req else float("nan"),
                "lat_p50_ms": 1000 * percentile(s["hist"], 0.5),
                "lat_p95_ms": 1000 * percentile(s["hist"], 0.95),
                "mb": s["bytes"] / 1e6,
            }
        return out

    def record(self) -> dict[str, Any]:
        """The JSON-ready figures of these totals (NaN where undefined)."""
        rec: dict[str, Any] = {
            "data_wait_frac": self.data_wait_frac,
            "startup_s": self.startup_s / max(self.ranks, 1),
            "supply_frac": self.supply_frac,
            "sync_frac": self.sync_frac,
            "hs_mb_per_s": self.rate(self.hs_bytes) / 1e6,
            "hs_bytes_per_sample": self.hs_bytes / self.samples if self.samples else float("nan"),
        }
        if self.servers:
            rec["servers"] = self.server_summary()
        return rec


class TrainMeter:
    """Per-rank timers and counters around the loader and the source; aggregates over ranks on demand."""

    def __init__(
        self,
        *,
        kind: str,
        urls: Iterable[str] = (),
        server_stats: Callable[[], dict[str, dict[str, float]]] | None = None,
        server_latency: LatencyHistogram | None = None,
        device: torch.device | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.kind = kind
        self.urls = sorted({u.rstrip("/") for u in urls})
        self._server_stats = server_stats  # streaming: the dataset's shared per-server counters
        self._server_latency = server_latency
        # A remote source is timed here, one request per call.
        self._local = {u: dict.fromkeys(SERVER_FIELDS, 0.0) for u in self.urls}
        self._local_latency = LatencyHistogram(self.urls)
        self._sync_cuda = device is not None and device.type == "cuda"
        self.clock = clock
        self.t0: float | None = None
        self.t_end: float | None = None
        self.wait_s = self.startup_s = self.supply_s = self.sync_s = 0.0
        self.sup_bytes = self.samples = self.tokens = 0.0
        self._last: Totals | None = None

    @classmethod
    def for_parts(
        cls, parts: Any, server_urls: Iterable[str] = (), device: torch.device | None = None
    ) -> TrainMeter:
        """A meter for the trainer's parts: the source's kind, and its servers' counters when it has them.

        `server_urls` (the recipe's) name the servers of a remote source: the same list on every rank, so the
        per-server vectors line up in the all-reduce.
        """
        kind = classify_source(parts.source)
        ds = parts.dataset
        if kind == PREFETCHED:
            return cls(
                kind=kind,
                urls=getattr(ds, "urls", ()),
                server_stats=ds.server_stats,
                server_latency=getattr(ds, "latency", None),
                device=device,
            )
        urls = list(server_urls)
        if (
            kind == REMOTE
            and isinstance(getattr(parts.source, "url", None), str)
            and parts.source.url not in urls
        ):
            urls.append(parts.source.url)
        # A source failing over between servers keeps their counters (errors, outages) itself.
        stats = getattr(parts.source, "server_stats", None) if kind == REMOTE else None
        return cls(
            kind=kind,
            urls=urls if kind == REMOTE else (),
            server_stats=stats if callable(stats) else None,
            device=device,
        )

    # -- timing hooks -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Training starts now (time before this - loading, warm-up - is not counted)."""
        self.t0 = self.clock()

    def stop(self) -> None:
        """Training ended now: later aggregates keep this wall time (export and teardown are not counted)."""
        if self.t0 is not None and self.t_end is None:
            self.t_end = self.clock()

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield from `batches`, counting the time blocked in iter()/next() as data wait (start-up until the
        first batch apart)."""
        t = self.clock()
        it = iter(batches)  # starts the DataLoader workers
        first = True
        while True:
            try:
                batch = next(it)
            except StopIteration:
                self.wait_s += self.clock() - t
                return
            dt = self.clock() - t
            if first:
                self.startup_s += dt
                first = False
            else:
                self.wait_s += dt
            yield batch
            t = self.clock()

    def fetch(self, source: Callable[[Any], Any], batch: dict[str, torch.Tensor]) -> Any:
        """`source(batch)`, timed as data wait (remote, prefetched) or supply (in-process); counts its bytes."""
        t = self.clock()
        sup = source(batch)
        if self.kind == IN_PROCESS and self._sync_cuda:
            torch.cuda.synchronize()  # the target's kernels are async: charge them here, not to the loss
        dt = self.clock() - t
        if self.kind == IN_PROCESS:
            self.supply_s += dt
        else:
            self.wait_s += dt
        self.account(batch, sup, dt, getattr(source, "url", None))
        return sup

    def account(self, batch: dict[str, torch.Tensor], sup: Any, call_s: float, url: str | None) -> None:
        """Count a batch's supervision (bytes, samples, tokens; for server `url`: a request, latency `call_s`).

        `fetch` calls it; a source called ahead in a thread (supply/call_ahead.py) is timed there, and the
        trainer's wait for it is data wait counted by `timed`."""
        nbytes = _nbytes(sup)
        self.sup_bytes += nbytes
        mask = batch.get("attention_mask")
        self.samples += int(batch["input_ids"].shape[0])
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        if self.kind == REMOTE and url in self._local:
            s = self._local[url]
            s["requests"] += 1
            s["latency_s"] += call_s
            s["bytes"] += nbytes
            self._local_latency.observe(url, call_s)

    def synced(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` (the gradient all-reduce), timed as peer wait (on GPU up to the collective's end)."""
        t = self.clock()
        try:
            out = fn(*args)
            if self._sync_cuda:
                torch.cuda.synchronize()  # NCCL returns once enqueued; the wait would land on the next sync
            return out
        finally:
            self.sync_s += self.clock() - t

    # -- totals ---------------------------------------------------------------------------------------------
    def _vector(self) -> list[float]:
        end = self.t_end if self.t_end is not None else self.clock()
        wall = end - self.t0 if self.t0 is not None else 0.0
        vec = [
            wall,
            self.wait_s,
            self.startup_s,
            self.supply_s,
            self.sync_s,
            self.sup_bytes,
            self.samples,
            self.tokens,
        ]
        shared = self._server_stats() if self._server_stats is not None else {}
        hist = (self._server_latency or self._local_latency).counts()
        for url in self.urls:
            s = shared.get(url) or self._local[url]
            vec += [float(s.get(k, 0.0)) for k in SERVER_FIELDS]
            vec += list(hist.get(url, [0.0] * N_BINS))
        return vec

    def aggregate(self, env: Any = None) -> Totals:
        """Cumulative totals summed over ranks (a collective when distributed: call on every rank).

        `env` is the trainer's DistEnv (its `sum_over_ranks` does the all-reduce), or None for one process.
        """
        vec = self._vector()
        ranks = 1
        if env is not None and getattr(env, "distributed", False):
            vec = env.sum_over_ranks(vec)
            ranks = env.world_size
        head = dict(zip(_RUN_FIELDS, vec[: len(_RUN_FIELDS)]))
        servers, pos, width = {}, len(_RUN_FIELDS), len(SERVER_FIELDS) + N_BINS
        for url in self.urls:
            chunk = vec[pos : pos + width]
            s: dict[str, Any] = dict(zip(SERVER_FIELDS, chunk[: len(SERVER_FIELDS)]))
            s["hist"] = chunk[len(SERVER_FIELDS) :]
            servers[url] = s
            pos += width
        return Totals(ranks=ranks, **head, servers=servers)

    def window(self, env: Any = None) -> tuple[Totals, Totals]:
        """(since the previous call, cumulative), both summed over ranks (collective)."""
        total = self.aggregate(env)
        win = total.minus(self._last)
        self._last = total
        return win, total


def _nbytes(sup: Any) -> int:
    fn = getattr(sup, "nbytes", None)
    if callable(fn):
        return int(fn())
    if isinstance(sup, dict):
        return sum(v.numel() * v.element_size() for v in sup.values() if isinstance(v, torch.Tensor))
    return 0


def format_window(win: Totals, kind: str) -> tuple[str, list[str]]:
    """(suffix for the progress line, extra per-server lines) for one window of telemetry."""
    parts = [f"wait {_pct(win.data_wait_frac)}"]
    if kind == IN_PROCESS:
        parts.append(f"target fwd {_pct(win.supply_frac)}")
    parts.append(f"{human_bytes(win.rate(win.hs_bytes))}/s")
    lines = []
    if win.servers:
        cells = []
        for url, s in win.server_summary().items():
            cells.append(
                f"{short_url(url)} {s['requests']} req {s['errors']} err "
                f"p50 {_ms(s['lat_p50_ms'])} p95 {_ms(s['lat_p95_ms'])}"
            )
        lines.append("  servers: " + " | ".join(cells))
    return " | ".join(parts), lines


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, 3 significant digits)."""
    if not math.isfinite(n):
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} GB"  # unreachable; keeps type checkers calm


def short_url(url: str) -> str:
    """'http://node7:8765' -> 'node7:8765'."""
    return url.split("://", 1)[-1].rstrip("/")


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else "?"


def _ms(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:.0f}ms" if x < 10_000 else f"{x / 1000:.1f}s"
