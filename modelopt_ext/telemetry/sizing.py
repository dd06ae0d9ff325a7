"""How many hidden-state servers keep the trainers fed: THE sizing rule (one function, used by the run summary).

    servers needed = ceil(trainers x demand per trainer x (1 + headroom) / supply per server)

- demand per trainer: what one trainer rank consumes when its data is ready (samples/s or tokens/s; the
  telemetry's `demand_tokens_per_s` / ranks: tokens over the time NOT spent waiting);
- supply per server: what one server delivers when it is kept busy (the telemetry's `supply_tokens_per_s` /
  servers). Only a STARVED run keeps its servers busy; in a run that kept up, the servers idled part of the
  time, so the measured figure is a lower bound of their capacity and the advice an upper bound;
- headroom: the scaling benchmark (`python -m modelopt_ext.bench.scaling`, docs/scaling.md) measures
  94-99% of the ideal min(N*S, M*D) on steady, equal servers with the least-outstanding choice (96-97% where
  supply exactly equals demand), data wait under 5%: 10% covers that. Bursty supply (per-request times that
  vary a lot) needed 50% there to reach 85%: pass a larger `headroom` when p95 latency >> p50.

Serve "nodes" per trainer "node" follow by scaling with how many trainer ranks and servers a node holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HEADROOM = 0.10


@dataclass(frozen=True)
class SizingAdvice:
    """The answer of `size_servers` (rates in the caller's unit: samples/s or tokens/s)."""

    servers_needed: int
    servers_per_trainer: float  # fractional: servers for one trainer rank, headroom included
    supply_per_server: float
    demand_per_trainer: float
    trainers: int
    headroom: float
    upper_bound: bool  # supply was not saturated when measured: fewer servers may do

    def line(self, unit: str = "tok/s", servers_now: int | None = None) -> str:
        """One line for a summary."""
        now = f" (now {servers_now})" if servers_now is not None else ""
        bound = "at most " if self.upper_bound else ""
        return (
            f"sizing: {bound}{self.servers_needed} server(s){now} keep {self.trainers} trainer(s) fed = "
            f"{bound}{self.servers_per_trainer:.2f} server(s) per trainer rank (demand {self.demand_per_trainer:,.0f} "
            f"{unit} per trainer, supply {'>= ' if self.upper_bound else ''}{self.supply_per_server:,.0f} {unit} "
            f"per server, {100 * self.headroom:.0f}% headroom)"
        )


def size_servers(
    supply_per_server: float,
    demand_per_trainer: float,
    trainers: int,
    *,
    headroom: float = HEADROOM,
    upper_bound: bool = False,
    servers_now: int | None = None,
) -> SizingAdvice:
    """Servers needed so that `trainers` ranks, each consuming `demand_per_trainer`, never wait for data.

    `upper_bound`: `supply_per_server` is a lower bound (the servers were not saturated when measured, the
    trainers were fed): then the advice never exceeds `servers_now`, which demonstrably kept up.
    """
    if not (supply_per_server > 0 and math.isfinite(supply_per_server)):
        raise ValueError(f"supply per server must be a positive number, got {supply_per_server!r}")
    if not (demand_per_trainer >= 0 and math.isfinite(demand_per_trainer)):
        raise ValueError(f"demand per trainer must be a number >= 0, got {demand_per_trainer!r}")
    if trainers < 1 or headroom < 0:
        raise ValueError("need trainers >= 1 and headroom >= 0")
    per_trainer = demand_per_trainer * (1 + headroom) / supply_per_server
    # round() first: 2.0000000001 servers from float noise is 2, not 3.
    needed = max(1, math.ceil(round(trainers * per_trainer, 9)))
    if upper_bound and servers_now:
        needed = min(needed, servers_now)
        per_trainer = min(per_trainer, servers_now / trainers)
    return SizingAdvice(
        servers_needed=needed,
        servers_per_trainer=per_trainer,
        supply_per_server=supply_per_server,
        demand_per_trainer=demand_per_trainer,
        trainers=trainers,
        headroom=headroom,
        upper_bound=upper_bound,
    )


@dataclass(frozen=True)
class MeasuredRates:
    """A run's figures the rule needs, read from its metrics.json (`rates_from_metrics`)."""

    supply_per_server: float  # tok/s one server delivered
    demand_per_rank: float  # tok/s one trainer rank could consume with no wait
    servers: int
    ranks: int
    saturated: bool  # the run was starved, so its servers were busy and supply is their capacity


def rates_from_metrics(m: dict, saturated: bool) -> MeasuredRates | None:
    """Supply per server and demand per trainer rank of a run (its metrics.json as a dict), or None when the
    run had no hidden-state servers or no figures. `saturated`: the run was starved (summary.is_starved)."""
    servers, ranks = len(m.get("servers") or {}), int(m.get("world_size") or 1)
    supply, demand = m.get("supply_tokens_per_s"), m.get("demand_tokens_per_s")
    real = [isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (supply, demand)]
    if not servers or not all(real) or supply <= 0 or demand < 0:
        return None
    return MeasuredRates(supply / servers, demand / ranks, servers, ranks, bool(saturated))


def size_for_plan(rates: MeasuredRates, trainer_ranks: int, *, headroom: float = HEADROOM) -> SizingAdvice:
    """The rule for `trainer_ranks` ranks (another job's shape) from a measured run's rates.

    A run that kept up bounds its servers' capacity from below: the advice is then capped at the servers per
    rank that demonstrably kept up, scaled to `trainer_ranks`.
    """
    cap = None if rates.saturated else math.ceil(round(trainer_ranks * rates.servers / rates.ranks, 9))
    return size_servers(
        rates.supply_per_server,
        rates.demand_per_rank,
        trainer_ranks,
        headroom=headroom,
        upper_bound=not rates.saturated,
        servers_now=cap,
    )
