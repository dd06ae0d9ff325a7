"""Request-latency histograms per server: fixed log-spaced bins, so counts from many processes simply add up.

DataLoader workers are separate processes; each records its own requests. A histogram with FIXED bin edges can
live in shared memory (`shared=True`, a multiprocessing Array created in the parent before the workers start)
and be summed over ranks with one all-reduce, which exact percentiles over raw samples could not. Resolution:
8 bins per decade from 1 ms to 1000 s (edges 1.33x apart), interpolated in log space inside a bin; latencies
below 1 ms land in the first bin, above 1000 s in the last.
"""

from __future__ import annotations

import math
import multiprocessing
import threading
from collections.abc import Sequence

LO_S = 1e-3  # upper edge of bin 0
BINS_PER_DECADE = 8
DECADES = 6
N_BINS = BINS_PER_DECADE * DECADES + 1  # bin 0: <= 1 ms; last bin: > 1000 s


def bin_index(seconds: float) -> int:
    """The bin a latency falls in (0 .. N_BINS-1)."""
    if not seconds > LO_S:  # also NaN
        return 0
    i = math.ceil(math.log10(seconds / LO_S) * BINS_PER_DECADE - 1e-9)
    return min(max(i, 0), N_BINS - 1)


def bin_edges(i: int) -> tuple[float, float]:
    """(lower, upper) seconds of bin i; bin 0 spans [LO_S/1.33, LO_S], the last one is open (shown 1.33x wide)."""
    upper = LO_S * 10 ** (i / BINS_PER_DECADE)
    return upper / 10 ** (1 / BINS_PER_DECADE), upper


def percentile(counts: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) in seconds of a histogram's counts; NaN when it is empty."""
    total = float(sum(counts))
    if total <= 0:
        return float("nan")
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        if seen + c >= rank:
            lo, hi = bin_edges(i)
            frac = min(max((rank - seen) / c, 0.0), 1.0)
            return lo * (hi / lo) ** frac  # geometric interpolation: bins are log-spaced
        seen += c
    return bin_edges(len(counts) - 1)[1]


class LatencyHistogram:
    """One histogram per server URL; `shared=True` puts the counts in memory shared with forked/spawned workers."""

    def __init__(self, urls: Sequence[str], shared: bool = False):
        self.urls = list(urls)
        n = len(self.urls) * N_BINS
        if shared:
            # Spawn-context lock: inherited by forked workers AND picklable into spawned ones (a fork-context
            # SemLock refuses to pickle into a spawn-started DataLoader worker).
            self._arr = multiprocessing.get_context("spawn").Array("d", n, lock=True)
            self._lock = self._arr.get_lock()
        else:
            self._arr = [0.0] * n
            self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # A spawned worker gets the shared Array (multiprocessing allows that at process start) and a lock
        # rebuilt from it; a local histogram's thread lock cannot be pickled.
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = self._arr.get_lock() if hasattr(self._arr, "get_lock") else threading.Lock()

    def observe(self, url: str, seconds: float) -> None:
        """Count one request of `seconds` to `url` (unknown URLs are ignored: telemetry must never fail a fetch)."""
        try:
            base = self.urls.index(url) * N_BINS
        except ValueError:
            return
        with self._lock:
            self._arr[base + bin_index(seconds)] += 1

    def counts(self) -> dict[str, list[float]]:
        """url -> bin counts (a copy)."""
        with self._lock:
            vals = list(self._arr)
        return {u: vals[i * N_BINS : (i + 1) * N_BINS] for i, u in enumerate(self.urls)}
