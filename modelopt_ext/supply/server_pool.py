"""Which hidden-state server gets the next request: the least loaded healthy server, circuit breakers, failover.

Pure logic (no HTTP): the streaming dataset asks the pool for a server, reports how the request went, and the
pool decides who is in rotation and who gets the next request. Per server a circuit breaker:

- CLOSED (healthy, in rotation); `failure_threshold` consecutive failures -> OPEN (out of rotation);
- OPEN -> after a cooldown one trial request is let through (HALF_OPEN); success -> CLOSED (the server is back),
  failure -> OPEN again with the cooldown doubled (capped), so a dead server costs one probe per cooldown.

Choice (`balance`): `least_outstanding` (default) sends the request to the server in rotation with the fewest
requests in flight from this rank (all its DataLoader workers together, counted in shared memory), ties broken
round-robin; `round_robin` takes the next server in rotation whatever its load. Plain round-robin gives every
server the same number of requests, so one slow server (heterogeneous nodes, a busy or degraded one) holds
back every worker that lands on it; counting what is in flight sends work where it gets done, and on equal
servers it still spreads requests evenly. Where each process starts is decided by `first_server` (the one
owner of "which server does rank r use first", for every client: vLLM streaming, serve_target, hybrid, dump). The choice never changes WHICH samples are fetched or their order (the dataset is
map-style: item i depends only on i), so data order and exact resume do not depend on it. `acquire(avoid=...)` lets a sample that failed
on a server go to another healthy one (failover) while that server is still formally in rotation.

Counters per server (requests, errors, latency, bytes, down/up events) are kept for telemetry; they can live in
memory shared by all DataLoader workers of a rank (`SharedServerStats`) so the trainer process sees the totals.
The same shared memory carries each server's "out of rotation until" time: when one worker's breaker opens, its
sibling workers skip that server at once instead of each paying `failure_threshold` failures (a hung server
would otherwise cost every worker several request timeouts). Monotonic clock times are comparable across
processes of one host. Requests in flight are counted per process slot (the DataLoader worker id): a worker
that starts clears its slot, so counts left by a worker that was stopped mid-request do not linger.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
LEAST_OUTSTANDING, ROUND_ROBIN = "least_outstanding", "round_robin"
BALANCE_POLICIES = (LEAST_OUTSTANDING, ROUND_ROBIN)


def local_rank_from_env() -> int:
    """This process's rank on its node (LOCAL_RANK, as accelerate and torchrun set it; 0 for one process)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def first_server(num_servers: int, local_rank: int = 0, worker_id: int = 0, workers_per_rank: int = 1) -> int:
    """The index in `data.server_urls` where one process of a trainer node starts.

    `data.server_urls` is this node's preference order: the entry script passes the servers with the node's
    preferred one (the same segment, from the launcher's role plan) first. Process `worker_id` of
    `workers_per_rank` (DataLoader workers; 1 where the source runs in the rank itself) of local rank
    `local_rank` starts at `(local_rank * workers_per_rank + worker_id) % num_servers`: the node's first
    process starts at its preferred server and the node's other processes spread evenly over the rest, so
    the first requests of a node do not all hit one server. Every client asks this function.
    """
    if num_servers < 1:
        raise ValueError("no hidden-state server to start at (data.server_urls is empty)")
    if local_rank < 0 or worker_id < 0 or workers_per_rank < 1 or worker_id >= workers_per_rank:
        raise ValueError(
            f"bad process position: local rank {local_rank}, worker {worker_id} of {workers_per_rank}"
        )
    return (local_rank * workers_per_rank + worker_id) % num_servers


class NoHealthyServerError(RuntimeError):
    """Every hidden-state server stayed out of rotation for longer than the allowed wait."""


@dataclass
class BreakerPolicy:
    """When a server leaves and re-enters rotation."""

    failure_threshold: int = 3  # consecutive failures that take a server out of rotation
    cooldown_s: float = 2.0  # first wait before a half-open trial request
    max_cooldown_s: float = 30.0  # cap of the doubling cooldown
    all_down_timeout_s: float = 120.0  # no server healthy for this long -> NoHealthyServerError

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if self.cooldown_s < 0 or self.max_cooldown_s < self.cooldown_s:
            raise ValueError("need 0 <= cooldown_s <= max_cooldown_s")
        if self.all_down_timeout_s < 0:
            raise ValueError("all_down_timeout_s must be >= 0")


class CircuitBreaker:
    """One server's health: closed -> open after N consecutive failures -> half-open trial after a cooldown."""

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.clock = clock
        self.state = CLOSED
        self.consecutive_failures = 0
        self.cooldown_s = policy.cooldown_s
        self.open_until = 0.0
        self.trial_in_flight = False

    def available(self) -> bool:
        """May a request be sent now? (An open breaker past its cooldown becomes half-open: one trial.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self.clock() >= self.open_until:
            self.state = HALF_OPEN
            self.trial_in_flight = False
        return self.state == HALF_OPEN and not self.trial_in_flight

    def on_dispatch(self) -> None:
        """A request is being sent; in half-open state it is THE trial, others wait for its outcome."""
        if self.state == HALF_OPEN:
            self.trial_in_flight = True

    def on_success(self) -> bool:
        """Record a success; True when this closed an open/half-open breaker (the server is back)."""
        reopened = self.state != CLOSED
        self.state = CLOSED
        self.consecutive_failures = 0
        self.cooldown_s = self.policy.cooldown_s
        self.trial_in_flight = False
        return reopened

    def on_failure(self, trip: bool = False) -> bool:
        """Record a failure; True when this opened the breaker (the server just left rotation).

        `trip`: open at once, whatever the count (a timed-out request already cost a full timeout; waiting
        for `failure_threshold` of them would stall the trainer that many times).
        """
        self.consecutive_failures += 1
        self.trial_in_flight = False
        if self.state == HALF_OPEN or self.state == OPEN:
            # The trial failed: stay out, wait longer before the next probe.
            self.cooldown_s = min(self.cooldown_s * 2, self.policy.max_cooldown_s)
            self.state = OPEN
            self.open_until = self.clock() + self.cooldown_s
            return False
        if trip or self.consecutive_failures >= self.policy.failure_threshold:
            self.state = OPEN
            self.open_until = self.clock() + self.cooldown_s
            return True
        return False

    def seconds_until_trial(self) -> float:
        """0 when a request may go now; else how long until the next half-open trial."""
        if self.available():
            return 0.0
        if self.state == OPEN:
            return max(0.0, self.open_until - self.clock())
        return self.policy.cooldown_s  # half-open with a trial in flight (other thread): check again later


# Per-server counter slots in SharedServerStats (floats).
_FIELDS = ("requests", "errors", "latency_s", "bytes", "down_events", "up_events", "open", "open_until")


class SharedServerStats:
    """Per-server counters in shared memory: every DataLoader worker of a process adds to the same totals.

    Create it in the parent process before the DataLoader starts its workers (fork inherits it; spawn pickles
    it into the worker at start-up, which multiprocessing allows). `snapshot()` works in any of them.
    `slots`: processes that dispatch requests at once (DataLoader workers); each counts its requests in
    flight in its own slot (`begin`/`end`), and `snapshot()` adds them up per server as `outstanding`.
    """

    def __init__(self, urls: Sequence[str], slots: int = 1):
        self.urls = list(urls)
        self.slots = max(int(slots), 1)
        # A spawn-context lock: inherited by forked workers AND picklable into spawn/forkserver ones (a fork-context
        # lock refuses the latter).
        self._buf = multiprocessing.get_context("spawn").Array("d", self._size(), lock=True)

    def _size(self) -> int:
        return len(self.urls) * (len(_FIELDS) + self.slots)

    def _guard(self):
        return self._buf.get_lock()

    def _slot(self, url: str, field: str) -> int:
        return self.urls.index(url) * len(_FIELDS) + _FIELDS.index(field)

    def _flight_slot(self, slot: int, url: str) -> int:
        return len(self.urls) * len(_FIELDS) + (slot % self.slots) * len(self.urls) + self.urls.index(url)

    def add(self, url: str, **deltas: float) -> None:
        """Add to counters of `url`, e.g. add(u, requests=1, bytes=123)."""
        with self._guard():
            for field, delta in deltas.items():
                self._buf[self._slot(url, field)] += delta

    def set(self, url: str, field: str, value: float) -> None:
        """Set one counter (e.g. the `open` flag)."""
        with self._guard():
            self._buf[self._slot(url, field)] = value

    def begin(self, slot: int, url: str) -> None:
        """Process slot `slot` sent a request to `url` (one more in flight)."""
        with self._guard():
            self._buf[self._flight_slot(slot, url)] += 1

    def end(self, slot: int, url: str) -> None:
        """A request of slot `slot` to `url` ended (one fewer in flight; never below 0)."""
        with self._guard():
            i = self._flight_slot(slot, url)
            self._buf[i] = max(self._buf[i] - 1, 0.0)

    def reset_slot(self, slot: int) -> None:
        """A new process took slot `slot`: forget what a previous one there had in flight."""
        with self._guard():
            for url in self.urls:
                self._buf[self._flight_slot(slot, url)] = 0.0

    def snapshot(self) -> dict[str, dict[str, float]]:
        """url -> {requests, errors, latency_s, bytes, down_events, up_events, open, open_until, outstanding}."""
        with self._guard():
            vals = list(self._buf)
        n, k = len(_FIELDS), len(self.urls)
        out = {}
        for i, u in enumerate(self.urls):
            rec = dict(zip(_FIELDS, vals[i * n : (i + 1) * n]))
            rec["outstanding"] = sum(vals[k * n + s * k + i] for s in range(self.slots))
            out[u] = rec
        return out


class LocalServerStats(SharedServerStats):
    """The same counters in plain process memory (unit tests, single-process use)."""

    def __init__(self, urls: Sequence[str], slots: int = 1):
        self.urls = list(urls)
        self.slots = max(int(slots), 1)
        self._buf = [0.0] * self._size()
        self._lock = threading.Lock()

    def _guard(self):
        return self._lock


class ServerPool:
    """Chooses among the servers whose breaker lets requests through (`balance`), round-robin from `start_offset`.

    `slot`: this process's slot in `stats` (its DataLoader worker id) for the requests-in-flight counts.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        start_offset: int = 0,
        policy: BreakerPolicy | None = None,
        stats: SharedServerStats | None = None,
        clock: Callable[[], float] = time.monotonic,
        balance: str = LEAST_OUTSTANDING,
        slot: int = 0,
    ):
        if not urls:
            raise ValueError("ServerPool needs at least one server URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"duplicate server URLs: {list(urls)}")
        if balance not in BALANCE_POLICIES:
            raise ValueError(f"balance must be one of {list(BALANCE_POLICIES)}, got {balance!r}")
        self.balance = balance
        self.slot = slot
        self._in_flight = dict.fromkeys(urls, 0)  # this pool's own requests in flight (what it may end)
        self.urls = list(urls)
        self.policy = policy or BreakerPolicy()
        self.clock = clock
        self.breakers = {u: CircuitBreaker(self.policy, clock) for u in self.urls}
        self.stats = stats if stats is not None else LocalServerStats(self.urls)
        self._cursor = start_offset % len(self.urls)
        self._all_down_since: float | None = None
        self._last_error: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- choosing a server -------------------------------------------------------------------------------
    def acquire(self, avoid: Iterable[str] = ()) -> str | None:
        """The server for the next request (preferring ones not in `avoid`), or None when none may be used now.

        Among the servers in rotation: the one with the fewest requests in flight (`least_outstanding`; the
        first in round-robin order on a tie) or simply the next one (`round_robin`). `avoid` holds the servers
        a sample already failed on: it goes elsewhere when any other server is available, and back to one of
        them only when nothing else is (a lone server gets retried). Every server returned must be ended with
        `record_success`, `record_failure` or `release`.
        """
        avoid = set(avoid)
        with self._lock:
            n = len(self.urls)
            fallback = None
            candidates: list[tuple[int, str]] = []
            shared = self.stats.snapshot()
            now = self.clock()
            for step in range(n):
                url = self.urls[(self._cursor + step) % n]
                breaker = self.breakers[url]
                if not breaker.available():
                    continue
                if breaker.state == CLOSED and shared[url]["open_until"] > now:
                    continue  # a sibling process (another DataLoader worker) just took it out of rotation
                if url in avoid:
                    fallback = fallback or (step, url)
                    continue
                candidates.append((step, url))
                if self.balance == ROUND_ROBIN:
                    break
            if candidates:
                # min() keeps the first of equals: round-robin order breaks ties.
                chosen = min(candidates, key=lambda c: shared[c[1]]["outstanding"])
            elif fallback is not None:
                chosen = fallback
            else:
                self._note_all_down()
                return None
            step, url = chosen
            self._cursor = (self._cursor + step + 1) % n
            self.breakers[url].on_dispatch()
            self._in_flight[url] += 1
        self.stats.begin(self.slot, url)
        return url

    def _end(self, url: str) -> None:
        # Only requests this pool dispatched end here (an outcome recorded without acquire() counts nothing).
        with self._lock:
            if self._in_flight[url] <= 0:
                return
            self._in_flight[url] -= 1
        self.stats.end(self.slot, url)

    def outstanding(self) -> dict[str, int]:
        """url -> requests in flight from every process sharing these counters (this rank's workers)."""
        return {u: int(s["outstanding"]) for u, s in self.stats.snapshot().items()}

    def seconds_until_available(self) -> float:
        """How long until some server may be tried again (0 if one may be tried now)."""
        with self._lock:
            shared = self.stats.snapshot()
            now = self.clock()
            waits = []
            for u, b in self.breakers.items():
                w = b.seconds_until_trial()
                if b.state == CLOSED:
                    w = max(w, shared[u]["open_until"] - now)
                waits.append(max(w, 0.0))
            return min(waits)

    def check_all_down_timeout(self) -> None:
        """Raise NoHealthyServerError once no server has been healthy for `all_down_timeout_s`."""
        with self._lock:
            since = self._all_down_since
            if since is None or self.clock() - since < self.policy.all_down_timeout_s:
                return
            errors = "; ".join(f"{u}: {self._last_error.get(u, 'out of rotation')}" for u in self.urls)
        raise NoHealthyServerError(
            f"no healthy hidden-state server for {self.policy.all_down_timeout_s:.0f}s "
            f"(all {len(self.urls)} out of rotation); last errors: {errors}"
        )

    def _note_all_down(self) -> None:
        if self._all_down_since is None and not self._usable_closed():
            self._all_down_since = self.clock()

    def _usable_closed(self) -> list[str]:
        # Closed here and not taken out of rotation by a sibling process.
        shared = self.stats.snapshot()
        now = self.clock()
        return [u for u, b in self.breakers.items() if b.state == CLOSED and shared[u]["open_until"] <= now]

    # -- outcomes ----------------------------------------------------------------------------------------
    def record_success(self, url: str, latency_s: float, nbytes: int) -> None:
        """A request to `url` succeeded: count it; a server that was out of rotation is back in."""
        self._end(url)
        with self._lock:
            back = self.breakers[url].on_success()
            self._all_down_since = None
        self.stats.add(url, requests=1, latency_s=latency_s, bytes=nbytes)
        if back or self.stats.snapshot()[url]["open_until"]:
            self.stats.set(url, "open_until", 0)
        if back:
            self.stats.add(url, up_events=1)
            self.stats.set(url, "open", 0)
            log.warning("hidden-state server %s is back in rotation", url)

    def record_failure(self, url: str, error: str, latency_s: float = 0.0, trip: bool = False) -> None:
        """A request to `url` failed (`error`: one line): count it; maybe take the server out of rotation.

        `trip=True` (a timeout) takes it out at once.
        """
        self._end(url)
        with self._lock:
            opened = self.breakers[url].on_failure(trip)
            self._last_error[url] = error
            self._note_all_down()
            healthy = len(self._usable_closed())
        self.stats.add(url, requests=1, errors=1, latency_s=latency_s)
        if self.breakers[url].state == OPEN:
            # Siblings sharing these counters skip the server until the same cooldown ends.
            self.stats.set(url, "open_until", self.breakers[url].open_until)
        if opened:
            self.stats.add(url, down_events=1)
            self.stats.set(url, "open", 1)
            log.error(
                "hidden-state server %s taken out of rotation after %d consecutive failure(s) (%s); %d/%d healthy",
                url,
                self.breakers[url].consecutive_failures,
                error,
                healthy,
                len(self.urls),
            )

    def release(self, url: str) -> None:
        """A dispatched request ended with neither verdict on the server (e.g. the sample itself was bad)."""
        self._end(url)
        with self._lock:
            self.breakers[url].trial_in_flight = False

    # -- introspection -----------------------------------------------------------------------------------
    def healthy(self) -> list[str]:
        """Servers currently in rotation (closed breaker here, not taken out by a sibling process)."""
        with self._lock:
            return self._usable_closed()

    def states(self) -> dict[str, str]:
        """url -> closed | open | half_open."""
        with self._lock:
            return {u: self.breakers[u].state for u in self.urls}
