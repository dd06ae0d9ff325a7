"""The sizing rule (telemetry/sizing.py) and where the run summary uses it."""

from __future__ import annotations

import math

import pytest

from modelopt_ext.telemetry.meter import PREFETCHED, Totals
from modelopt_ext.telemetry.sizing import HEADROOM, size_servers
from modelopt_ext.telemetry.summary import build_metrics, sizing, summary_lines


def test_rule_counts_servers_with_headroom():
    a = size_servers(supply_per_server=10.0, demand_per_trainer=10.0, trainers=4)
    assert a.servers_needed == 5  # 4 x 10 x 1.1 / 10 = 4.4 -> 5
    assert a.servers_per_trainer == pytest.approx(1.1)
    assert size_servers(10.0, 10.0, 4, headroom=0.0).servers_needed == 4  # exact, no float round-up to 5
    assert size_servers(30.0, 10.0, 3, headroom=0.0).servers_needed == 1
    assert size_servers(100.0, 0.0, 8).servers_needed == 1  # at least one server
    # Model-Optimizer's table: 1 serve node fed 1 trainer node but starved 2 (1.6x): 2 trainers need 2 serves.
    assert size_servers(1.6, 1.0, 2).servers_needed == 2
    assert HEADROOM == 0.10


@pytest.mark.parametrize(
    "kw",
    [
        {"supply_per_server": 0.0},
        {"supply_per_server": math.nan},
        {"demand_per_trainer": -1.0},
        {"trainers": 0},
    ],
)
def test_rule_refuses_nonsense(kw):
    args = {"supply_per_server": 10.0, "demand_per_trainer": 5.0, "trainers": 2, **kw}
    with pytest.raises(ValueError):
        size_servers(**args)


def _run(wait_s: float, n_servers: int) -> dict:
    servers = {
        f"http://n{i}:8765": {
            "requests": 10,
            "errors": 0,
            "latency_s": 1.0,
            "bytes": 1e6,
            "down_events": 0,
            "hist": [0.0] * 49,
        }
        for i in range(n_servers)
    }
    t = Totals(ranks=4, wall_s=400.0, wait_s=wait_s, samples=80, tokens=8000, servers=servers)
    return build_metrics(
        t, kind=PREFETCHED, global_step=10, start_step=0, total_steps=10, samples=80, tokens=8000, wall_s=100.0,
        final_metrics={}, num_workers=2,
    )  # fmt: skip


def test_starved_run_sizes_from_its_supply_and_demand():
    m = _run(wait_s=200.0, n_servers=2)  # 4 ranks waited half the time
    # supply 8000 tok / 100 s = 80 tok/s from 2 servers (40 each); demand 8000 / 50 s = 160 tok/s, 40 per rank.
    a = sizing(m)
    assert a.supply_per_server == pytest.approx(40.0) and a.demand_per_trainer == pytest.approx(40.0)
    assert a.servers_needed == 5 and not a.upper_bound  # 4 x 40 x 1.1 / 40
    text = "\n".join(summary_lines(m))
    assert "sizing: 5 server(s) (now 2) keep 4 trainer(s) fed = 1.10 server(s) per trainer rank" in text
    assert "about 5 to keep up" in text  # the STARVED verdict uses the same rule


def test_fed_run_gives_an_upper_bound():
    m = _run(wait_s=8.0, n_servers=4)
    a = sizing(m)
    # The servers idled: their capacity is at least what they gave (4 x 20.4 x 1.1 / 20 = 4.5), and the 4 of them
    # kept up, so the advice is at most 4.
    assert a.upper_bound and a.servers_needed == 4 and a.servers_per_trainer == pytest.approx(1.0)
    assert "sizing: at most 4 server(s) (now 4) keep 4 trainer(s) fed" in "\n".join(summary_lines(m))
    assert size_servers(20.0, 5.0, 4, upper_bound=True, servers_now=4).servers_needed == 2


def test_no_servers_no_sizing():
    m = _run(wait_s=8.0, n_servers=0)
    assert sizing(m) is None
    assert "sizing:" not in "\n".join(summary_lines(m))
