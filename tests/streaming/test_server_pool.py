"""Pure-logic tests of the server pool: round-robin offsets, least-outstanding choice, circuit breaker, failover,
all-down timeout."""

from __future__ import annotations

import pytest

from modelopt_ext.supply.server_pool import (
    CLOSED,
    HALF_OPEN,
    LEAST_OUTSTANDING,
    OPEN,
    ROUND_ROBIN,
    BreakerPolicy,
    LocalServerStats,
    NoHealthyServerError,
    ServerPool,
    SharedServerStats,
    first_server,
    local_rank_from_env,
)

URLS = ["http://a", "http://b", "http://c"]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(start=0, clock=None, balance=LEAST_OUTSTANDING, **policy) -> ServerPool:
    pol = BreakerPolicy(**{"failure_threshold": 3, "cooldown_s": 10.0, "max_cooldown_s": 40.0, **policy})
    return ServerPool(URLS, start_offset=start, policy=pol, clock=clock or Clock(), balance=balance)


def served(pool: ServerPool, n: int) -> list[str | None]:
    """n requests, each completed (success) before the next: the servers they went to."""
    got = []
    for _ in range(n):
        url = pool.acquire()
        got.append(url)
        if url is not None:
            pool.record_success(url, 0.01, 1)
    return got


def test_round_robin_starts_at_offset_and_cycles():
    for start in range(7):
        pool = make(start=start)
        got = [pool.acquire() for _ in range(6)]
        first = start % 3
        assert got == [URLS[(first + i) % 3] for i in range(6)]


def test_rank_worker_offsets_spread_first_requests_evenly():
    # 2 local ranks x 2 workers over 4 servers: every process's first request goes to a different server.
    urls = [f"http://s{i}" for i in range(4)]
    firsts = [
        ServerPool(urls, start_offset=first_server(4, rank, worker, 2)).acquire()
        for rank in range(2)
        for worker in range(2)
    ]
    assert sorted(firsts) == urls


@pytest.mark.parametrize(
    "n,local_rank,worker,workers,expected",
    [
        (2, 0, 0, 1, 0),  # a node's first rank starts at its preferred server (the list's first URL)
        (2, 1, 0, 1, 1),
        (2, 2, 0, 1, 0),
        (3, 1, 1, 2, 0),  # (1 * 2 + 1) % 3
        (4, 1, 0, 2, 2),
        (1, 7, 3, 4, 0),
    ],
)
def test_first_server_is_local_rank_times_workers_plus_worker(n, local_rank, worker, workers, expected):
    assert first_server(n, local_rank, worker, workers) == expected


def test_first_server_every_process_of_a_node_spreads_from_the_preferred_one():
    # 2 servers, 4 ranks x 3 workers: the node's first process takes server 0 (its preferred one) and the
    # 12 processes split 6/6, whatever the list is (it is the node's own preference order).
    starts = [first_server(2, r, w, 3) for r in range(4) for w in range(3)]
    assert starts[0] == 0 and starts.count(0) == starts.count(1) == 6


@pytest.mark.parametrize(
    "args,message",
    [((0, 0), "data.server_urls is empty"), ((2, -1), "local rank -1"), ((2, 0, 2, 2), "worker 2 of 2")],
)
def test_first_server_refuses_impossible_positions(args, message):
    with pytest.raises(ValueError, match=message):
        first_server(*args)


def test_local_rank_comes_from_the_launchers_environment(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_rank_from_env() == 0
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_rank_from_env() == 3


def test_breaker_opens_after_threshold_and_skips_server():
    clock = Clock()
    pool = make(clock=clock)
    pool.record_failure("http://a", "refused")
    pool.record_failure("http://a", "refused")
    assert pool.states()["http://a"] == CLOSED
    pool.record_failure("http://a", "refused")
    assert pool.states()["http://a"] == OPEN
    assert pool.healthy() == ["http://b", "http://c"]
    assert {pool.acquire() for _ in range(10)} == {"http://b", "http://c"}
    snap = pool.stats.snapshot()["http://a"]
    assert snap["errors"] == 3 and snap["down_events"] == 1 and snap["open"] == 1


def test_success_resets_consecutive_failures():
    pool = make()
    for _ in range(5):
        pool.record_failure("http://a", "x")
        pool.record_failure("http://a", "x")
        pool.record_success("http://a", 0.01, 10)
    assert pool.states()["http://a"] == CLOSED


@pytest.mark.parametrize("balance", [LEAST_OUTSTANDING, ROUND_ROBIN])
def test_half_open_single_trial_then_close_on_success(balance):
    clock = Clock()
    pool = make(clock=clock, balance=balance)
    for _ in range(3):
        pool.record_failure("http://a", "refused")
    clock.t += 9.9
    assert "http://a" not in served(pool, 6)
    clock.t += 0.2  # cooldown over: exactly one trial request goes to a
    got = [pool.acquire() for _ in range(6)]
    assert got.count("http://a") == 1
    assert pool.states()["http://a"] == HALF_OPEN
    for url in got:  # the other requests ended without a verdict
        if url != "http://a":
            pool.release(url)
    pool.record_success("http://a", 0.02, 100)
    assert pool.states()["http://a"] == CLOSED
    assert pool.stats.snapshot()["http://a"]["up_events"] == 1
    assert served(pool, 3).count("http://a") == 1  # back in normal rotation
    assert pool.outstanding() == dict.fromkeys(URLS, 0)


def test_failed_trial_reopens_with_doubled_capped_cooldown():
    clock = Clock()
    pool = make(clock=clock)
    for _ in range(3):
        pool.record_failure("http://a", "refused")
    waits = []
    for _ in range(4):
        clock.t += 1000
        assert pool.breakers["http://a"].available()
        pool.breakers["http://a"].on_dispatch()
        pool.record_failure("http://a", "refused")
        assert pool.states()["http://a"] == OPEN
        waits.append(pool.breakers["http://a"].open_until - clock.t)
    assert waits == [20.0, 40.0, 40.0, 40.0]
    assert pool.stats.snapshot()["http://a"]["down_events"] == 1  # one outage, one event


def test_failover_prefers_other_servers_then_falls_back():
    pool = make()
    assert pool.acquire(avoid={"http://a"}) == "http://b"
    assert pool.acquire(avoid={"http://c", "http://a"}) == "http://b"
    # Only avoided servers left: the sample goes back to one of them rather than waiting forever.
    for _ in range(3):
        pool.record_failure("http://c", "down")
    assert pool.acquire(avoid={"http://a", "http://b"}) in {"http://a", "http://b"}


def test_all_down_returns_none_then_times_out_with_one_line():
    clock = Clock()
    pool = make(clock=clock, all_down_timeout_s=30.0)
    for u in URLS:
        for _ in range(3):
            pool.record_failure(u, f"{u} connection refused")
    assert pool.acquire() is None
    assert pool.seconds_until_available() == pytest.approx(10.0)
    pool.check_all_down_timeout()  # not yet
    clock.t += 31
    with pytest.raises(NoHealthyServerError) as e:
        pool.check_all_down_timeout()
    msg = str(e.value)
    assert "\n" not in msg and "no healthy hidden-state server" in msg
    assert all(f"{u}: {u} connection refused" in msg for u in URLS)


def test_recovery_clears_all_down_timer():
    clock = Clock()
    pool = make(clock=clock, all_down_timeout_s=30.0)
    for u in URLS:
        for _ in range(3):
            pool.record_failure(u, "x")
    clock.t += 20
    url = pool.acquire()
    assert url is not None
    pool.record_success(url, 0.01, 1)
    clock.t += 100
    pool.check_all_down_timeout()  # a server came back: no error


def test_counters_accumulate():
    pool = make()
    pool.record_success("http://b", 0.5, 1000)
    pool.record_success("http://b", 0.25, 24)
    pool.record_failure("http://b", "boom", 0.125)
    s = pool.stats.snapshot()["http://b"]
    assert s["requests"] == 3 and s["errors"] == 1 and s["bytes"] == 1024 and s["latency_s"] == 0.875


def test_bad_pool_arguments():
    with pytest.raises(ValueError, match="at least one"):
        ServerPool([])
    with pytest.raises(ValueError, match="duplicate"):
        ServerPool(["http://a", "http://a"])
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerPolicy(failure_threshold=0)


def test_siblings_sharing_counters_skip_a_server_one_of_them_took_out():
    # Two DataLoader workers of one rank share counters: when worker 1's breaker opens, worker 2 skips the
    # server at once (no failures of its own), and uses it again after the cooldown.
    clock = Clock()
    pol = BreakerPolicy(failure_threshold=2, cooldown_s=10.0, max_cooldown_s=40.0)
    shared = LocalServerStats(URLS)
    w1 = ServerPool(URLS, start_offset=0, policy=pol, clock=clock, stats=shared)
    w2 = ServerPool(URLS, start_offset=1, policy=pol, clock=clock, stats=shared)
    w1.record_failure("http://a", "timeout")
    assert "http://a" in {w2.acquire() for _ in range(3)}  # one failure: still in rotation everywhere
    w1.record_failure("http://a", "timeout")
    assert w2.states()["http://a"] == CLOSED and w2.healthy() == ["http://b", "http://c"]
    assert "http://a" not in {w2.acquire() for _ in range(6)}
    clock.t += 10.5
    assert "http://a" in {w2.acquire() for _ in range(3)}
    w2.record_success("http://a", 0.01, 1)  # the sibling's request worked: back for everyone
    assert shared.snapshot()["http://a"]["open_until"] == 0


def test_all_siblings_out_counts_as_all_down():
    clock = Clock()
    pol = BreakerPolicy(failure_threshold=1, cooldown_s=10.0, all_down_timeout_s=5.0)
    shared = LocalServerStats(URLS)
    w1 = ServerPool(URLS, policy=pol, clock=clock, stats=shared)
    w2 = ServerPool(URLS, policy=pol, clock=clock, stats=shared)
    for u in URLS:
        w1.record_failure(u, "refused")
    assert w2.acquire() is None
    assert w2.seconds_until_available() == pytest.approx(10.0)
    clock.t += 6
    with pytest.raises(NoHealthyServerError):
        w2.check_all_down_timeout()


def test_trip_opens_at_once():
    pool = make()
    pool.record_failure("http://b", "ReadTimeout after 300s", 300.0, trip=True)
    assert pool.states()["http://b"] == OPEN
    assert pool.stats.snapshot()["http://b"]["down_events"] == 1


# -- least outstanding --------------------------------------------------------------------------------------


def test_least_outstanding_prefers_the_idle_server_ties_round_robin():
    pool = make()
    a = pool.acquire()
    b = pool.acquire()
    assert (a, b) == ("http://a", "http://b")
    assert pool.outstanding() == {"http://a": 1, "http://b": 1, "http://c": 0}
    assert pool.acquire() == "http://c"  # the only idle one
    pool.record_success("http://b", 0.01, 1)
    assert pool.acquire() == "http://b"  # b finished first: it gets the next request, not a (round-robin's)
    pool.record_failure("http://a", "refused")
    pool.release("http://c")
    assert pool.outstanding() == {"http://a": 0, "http://b": 1, "http://c": 0}
    assert pool.acquire() == "http://c"  # a and c idle: the tie goes round-robin (cursor after b)


def test_round_robin_ignores_load():
    pool = make(balance=ROUND_ROBIN)
    got = [pool.acquire() for _ in range(4)]  # none of them completes
    assert got == ["http://a", "http://b", "http://c", "http://a"]
    assert pool.outstanding()["http://a"] == 2


def test_siblings_see_each_others_requests_in_flight():
    # Two DataLoader workers of one rank, each in its own slot of the shared counts.
    shared = LocalServerStats(URLS, slots=2)
    w0 = ServerPool(URLS, start_offset=0, stats=shared, slot=0)
    w1 = ServerPool(URLS, start_offset=0, stats=shared, slot=1)
    assert w0.acquire() == "http://a"
    assert w1.acquire() == "http://b"  # same cursor, but a is busy with w0's request
    assert w1.acquire() == "http://c"
    w0.record_success("http://a", 0.01, 1)
    assert w1.acquire() == "http://a"
    # A worker that died mid-request left its count; its successor in the same slot clears it.
    assert shared.snapshot()["http://b"]["outstanding"] == 1
    shared.reset_slot(1)
    assert all(s["outstanding"] == 0 for s in shared.snapshot().values())


def test_outcome_without_acquire_counts_nothing_and_never_goes_negative():
    shared = LocalServerStats(URLS, slots=2)
    w0 = ServerPool(URLS, stats=shared, slot=0)
    w1 = ServerPool(URLS, stats=shared, slot=1)
    assert w1.acquire() == "http://a"
    w0.record_success("http://a", 0.01, 1)  # w0 never sent it: w1's request is still in flight
    w0.record_failure("http://a", "x")
    w0.release("http://a")
    assert w0.outstanding()["http://a"] == 1
    w1.record_success("http://a", 0.01, 1)
    w1.release("http://a")
    assert w0.outstanding()["http://a"] == 0


def test_least_outstanding_keeps_failover_and_breakers():
    clock = Clock()
    pool = make(clock=clock)
    # avoid wins over load: the sample goes to b even though a is idle and b is busy.
    busy = pool.acquire(avoid={"http://a", "http://c"})
    assert busy == "http://b"
    assert pool.acquire(avoid={"http://a"}) == "http://c"
    assert pool.acquire(avoid={"http://a"}) in {"http://b", "http://c"}
    # A server out of rotation is skipped however idle it is.
    for _ in range(3):
        pool.record_failure("http://a", "refused")
    assert "http://a" not in served(pool, 6)
    clock.t += 10.1  # one half-open trial, then out again on failure
    got = [pool.acquire() for _ in range(4)]
    assert got.count("http://a") == 1
    pool.record_failure("http://a", "refused")
    assert pool.states()["http://a"] == OPEN


def test_bad_balance_is_named():
    with pytest.raises(ValueError, match="balance must be one of"):
        ServerPool(URLS, balance="random")


def test_shared_counts_cross_processes():
    # Real shared memory: a forked worker's request in flight is seen by its siblings (and the parent).
    import multiprocessing

    shared = SharedServerStats(URLS, slots=2)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_begin_in_child, args=(shared,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert ServerPool(URLS, stats=shared, slot=0).acquire() == "http://b"
    assert shared.snapshot()["http://a"]["outstanding"] == 1


def _begin_in_child(shared):
    ServerPool(URLS, stats=shared, slot=1).acquire()  # to a, never ended (the child "dies" mid-request)


def _closed_loop_share(balance: str, workers: int = 6, horizon_s: float = 200.0) -> dict[str, int]:
    """Discrete-event model: `workers` closed-loop fetchers of one rank (shared counts) over servers a, b, c,
    each a FIFO queue; a serves 1 request/s, b and c 2/s. Returns completed requests per server."""
    import heapq

    clock = Clock()
    shared = LocalServerStats(URLS, slots=workers)
    pools = [
        ServerPool(URLS, start_offset=w, stats=shared, slot=w, balance=balance, clock=clock)
        for w in range(workers)
    ]
    service = {"http://a": 1.0, "http://b": 0.5, "http://c": 0.5}
    free_at = dict.fromkeys(URLS, clock.t)
    done = dict.fromkeys(URLS, 0)
    events: list[tuple[float, int, str]] = []

    def send(w: int) -> None:
        url = pools[w].acquire()
        free_at[url] = max(free_at[url], clock.t) + service[url]
        heapq.heappush(events, (free_at[url], w, url))

    for w in range(workers):
        send(w)
    end = clock.t + horizon_s
    while events and events[0][0] <= end:
        clock.t, w, url = heapq.heappop(events)
        pools[w].record_success(url, service[url], 1)
        done[url] += 1
        send(w)
    return done


def test_least_outstanding_gets_more_from_a_heterogeneous_pool():
    rr = _closed_loop_share(ROUND_ROBIN)
    lo = _closed_loop_share(LEAST_OUTSTANDING)
    # Round-robin: equal shares, so the slow server (1/s) paces everything: ~3/s in all.
    assert max(rr.values()) - min(rr.values()) <= 3
    assert sum(rr.values()) < 3.2 * 200
    # Least outstanding: the fast servers get more; the total approaches the capacity 5/s (all three busy).
    assert lo["http://b"] > 1.5 * lo["http://a"] and lo["http://c"] > 1.5 * lo["http://a"]
    assert sum(lo.values()) > 4.7 * 200
