"""Servers x trainers scaling, measured by simulation: `python -m modelopt_ext.bench.scaling [--quick]`.

What decides how training scales with serve and train nodes, besides compute, is the client/server
scheduling: the server pool (which server gets a request, failover), DataLoader workers, the data-parallel
step. This benchmark runs all of it for real, at cluster shape, on one machine, by replacing compute with time:

- N stand-in servers (`scaling_server.py`) speak the real protocols (vLLM's hidden-state file protocol, or
  serve_target's HTTP + wire format) and each produce S samples/s (a FIFO queue with 1/S s per sample instead
  of a target forward), with real files / replies of the configured shape;
- M trainer ranks (`scaling_rank.py`) are the real Trainer in a real gloo process group, with the real
  sampler, DataLoader workers, streaming dataset / remote client and telemetry; the drafter's step is a
  calibrated sleep so that each rank consumes D samples/s when its data is ready.

Per point it reads rank 0's telemetry (metrics.jsonl, after a warm-up) and reports: measured samples/s, the
ideal min(sum of server rates, M*D), efficiency = measured / ideal, the data-wait fraction, the per-server
request share (max/min) and hidden-state bytes/s. Scenarios: a homogeneous grid; heterogeneous servers (one
2x slower) with round-robin vs least-outstanding server choice; one server killed mid-run (throughput drop,
recovery time); serve_target (remote) points. Prints a table, draws a heat map (`--plot`), writes JSON
(`--out`); the last line reads `scaling efficiency: min X% mean Y% over K points` (streaming points with the
default server choice, no kill).

Everything binds to 127.0.0.1; every process started here is stopped before a point ends (bounded waits).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from modelopt_ext.supply.server_pool import LEAST_OUTSTANDING, ROUND_ROBIN
from modelopt_ext.util.proc import free_port, stop_group

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 120.0
SCENARIOS = ("homogeneous", "heterogeneous", "bursty", "kill", "remote", "control")


@dataclass(frozen=True)
class Point:
    """One measured configuration."""

    scenario: str  # homogeneous | heterogeneous | bursty | kill | remote | control
    servers: int
    ranks: int
    balance: str = LEAST_OUTSTANDING
    protocol: str = "vllm"  # vllm | serve_target
    slow_server: bool = False  # server 0 produces at half the rate
    kill: bool = False  # SIGKILL the last server at `kill_frac` of the steps
    bursty: bool = False  # exponential service times (mean 1/S) instead of constant ones
    rate_scale: float = 1.0  # servers at rate_scale x S ("control": 100x, the trainers alone set the pace)
    call_ahead: int = 1  # remote mode: batches fetched ahead of the step (data.call_ahead); 0 = in the step

    @property
    def label(self) -> str:
        return f"{self.scenario} {self.protocol} {choice(asdict(self))} N={self.servers} M={self.ranks}"


@dataclass
class Settings:
    """Rates and shapes shared by every point."""

    # Slow on purpose: scheduling jitter of a loaded small machine (tens of ms) must stay a small share of a step.
    rate: float = 5.0  # S: samples/s per server
    demand: float = 5.0  # D: samples/s per trainer rank
    batch_size: int = 2
    workers: int = 2  # DataLoader workers per rank (streaming fetch concurrency)
    tokens: int = 64  # tokens per sample
    hidden: int = 256
    layers: int = 4  # captured layers (3 aux + last, EAGLE-3's)
    steps: int = 60  # at most, per point; fewer where supply is low (see point_steps)
    target_s: float = 30.0  # aim for about this much training per point
    warmup_frac: float = 0.25  # the first steps are left out of the steady figures
    kill_frac: float = 0.4
    log_interval: int = 2
    service: str = "const"  # const | exp (bursty)
    point_timeout_s: float = 300.0

    @property
    def bytes_per_sample(self) -> int:
        """Payload bytes of one sample (bf16 hidden states of every captured layer + int64 token ids)."""
        return self.tokens * (2 * self.layers * self.hidden + 8)


def point_steps(point: Point, st: Settings) -> int:
    """Steps for a point: `st.steps`, fewer when the ideal rate would make it run past `st.target_s`."""
    supply = st.rate * point.rate_scale * (point.servers - (0.5 if point.slow_server else 0.0))
    ideal = min(supply, point.ranks * st.demand)
    fit = int(st.target_s * ideal / (st.batch_size * point.ranks))
    return max(min(st.steps, fit), min(st.steps, 30))


def choice(row: dict) -> str:
    """The client behaviour a row measures: the server choice (streaming) or the call-ahead depth (remote)."""
    if row.get("protocol") == "serve_target":
        return f"call_ahead={row.get('call_ahead', 1)}"
    return row["balance"]


def quick_points() -> list[Point]:
    """A few points covering every scenario (minutes on a 2-core machine)."""
    return [
        Point("homogeneous", 1, 1),
        Point("homogeneous", 2, 2),
        Point("homogeneous", 2, 1),
        Point("homogeneous", 1, 2),
        Point("heterogeneous", 2, 2, ROUND_ROBIN, slow_server=True),
        Point("heterogeneous", 2, 2, LEAST_OUTSTANDING, slow_server=True),
        Point("kill", 2, 1, kill=True),
        Point("remote", 1, 1, protocol="serve_target", call_ahead=0),
        Point("remote", 1, 1, protocol="serve_target"),
    ]


def full_points(servers: list[int], ranks: list[int]) -> list[Point]:
    """The homogeneous grid, heterogeneous before/after, kill and serve_target points."""
    pts = [Point("homogeneous", n, m) for n in servers for m in ranks]
    for n, m in [(2, 2), (4, 4), (8, 8), (4, 2), (8, 4)]:
        if n in servers and m in ranks:
            for bal in (ROUND_ROBIN, LEAST_OUTSTANDING):
                pts.append(Point("heterogeneous", n, m, bal, slow_server=True))
    # Bursty supply at exact balance, and with 25% / 50% more supply than demand (5 or 6 servers for 4 ranks).
    for n, m in [(4, 4), (8, 8), (5, 4), (6, 4)]:
        if n in servers and m in ranks:
            for bal in (ROUND_ROBIN, LEAST_OUTSTANDING):
                pts.append(Point("bursty", n, m, bal, bursty=True))
    for bal in (ROUND_ROBIN, LEAST_OUTSTANDING):
        pts.append(Point("kill", 4, 2, bal, kill=True))
    for n, m in [(1, 1), (2, 2), (4, 4)]:
        for ahead in (0, 1):  # before / after the call-ahead fetch
            pts.append(Point("remote", n, m, protocol="serve_target", call_ahead=ahead))
    # Control: servers 100x faster than S, so the trainers alone (their step, all-reduce, DataLoader) set the
    # pace: what this machine lets M simulated ranks reach, the ceiling of every point with M ranks.
    for m in ranks:
        pts.append(Point("control", m, m, rate_scale=100.0))
    return pts


# ---------------------------------------------------------------------------------------------- processes


def _env(**extra: str) -> dict[str, str]:
    # One thread per process: on a small machine spinning OpenMP threads would cost several x.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MODELOPT_EXT_ENABLE_NCCL": "0"}
    env.pop("MODELOPT_EXT_STOP_AFTER_STEPS", None)
    env.update(extra)
    return env


def _start_servers(
    point: Point, st: Settings, work: Path, root: Path
) -> tuple[list[subprocess.Popen], list[str], list[float]]:
    rate = st.rate * point.rate_scale
    rates = [rate / 2 if (point.slow_server and i == 0) else rate for i in range(point.servers)]
    procs, files = [], []
    try:
        for i, rate in enumerate(rates):
            url_file = work / f"server{i}.url"
            url_file.unlink(missing_ok=True)  # a --work folder reused: never read an old run's URL
            cmd = [
                sys.executable, "-m", "modelopt_ext.bench.scaling_server", "--protocol", point.protocol,
                "--rate", str(rate), "--service", "exp" if point.bursty else st.service, "--seed", str(i),
                "--layers", str(st.layers), "--hidden", str(st.hidden), "--url-file", str(url_file), "--root", str(root),
            ]  # fmt: skip
            with (work / f"server{i}.log").open("w") as log:
                procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        env=_env(),
                    )
                )
            files.append(url_file)
        deadline = time.monotonic() + START_TIMEOUT_S
        for i, (p, f) in enumerate(zip(procs, files)):
            while not f.exists():
                if p.poll() is not None or time.monotonic() > deadline:
                    log_text = (work / f"server{i}.log").read_text()[-400:]
                    raise RuntimeError(
                        f"stand-in server {i} did not start within {START_TIMEOUT_S:.0f}s: {log_text}"
                    )
                time.sleep(0.05)
        return procs, [f.read_text().strip() for f in files], rates
    except BaseException:
        for p in procs:
            stop_group(p)
        raise


def _start_ranks(
    point: Point, st: Settings, work: Path, urls: list[str], root: Path
) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    try:
        for r in range(point.ranks):
            cfg = {
                "out": str(work / "train"),
                "urls": urls,
                "root": str(root),
                "protocol": point.protocol,
                "balance": point.balance,
                "call_ahead": point.call_ahead,
                "demand": st.demand,
                "batch_size": st.batch_size,
                "workers": st.workers,
                "tokens": st.tokens,
                "hidden": st.hidden,
                "layers": st.layers,
                "steps": st.steps,
                "log_interval": st.log_interval,
            }
            cfg_path = work / f"rank{r}.json"
            cfg_path.write_text(json.dumps(cfg))
            env = _env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(point.ranks),
                MASTER_ADDR=LOOPBACK,
                MASTER_PORT=str(port),
            )
            if point.ranks == 1:
                for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                    env.pop(k)
            with (work / f"rank{r}.log").open("w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "modelopt_ext.bench.scaling_rank", str(cfg_path)],
                        cwd=REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        env=env,
                    )
                )
        return procs
    except BaseException:
        for p in procs:
            stop_group(p)
        raise


def _records(path: Path) -> list[dict[str, Any]]:
    from modelopt_ext.telemetry.plot import read_records

    return read_records(path)


def run_point(point: Point, st: Settings, work: Path, log=print) -> dict[str, Any]:
    """Run one configuration to the end (bounded by `st.point_timeout_s`); its row of figures."""
    work.mkdir(parents=True, exist_ok=True)
    for old in (work / "train" / "metrics.jsonl",):
        old.unlink(missing_ok=True)
    root = work / "shared"
    root.mkdir(exist_ok=True)
    t_start = time.monotonic()
    st = replace(st, steps=point_steps(point, st))
    servers, urls, rates = _start_servers(point, st, work, root)
    ranks: list[subprocess.Popen] = []
    kill_elapsed = None
    try:
        ranks = _start_ranks(point, st, work, urls, root)
        jsonl = work / "train" / "metrics.jsonl"
        kill_step = max(int(st.steps * st.kill_frac), 1)
        deadline = time.monotonic() + st.point_timeout_s
        while any(p.poll() is None for p in ranks):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{point.label}: not done after {st.point_timeout_s:.0f}s (logs in {work})"
                )
            if any(p.poll() not in (None, 0) for p in ranks):
                break  # one rank failed: the others would wait on it in the next collective
            if point.kill and kill_elapsed is None:
                recs = _records(jsonl)
                if recs and recs[-1]["step"] >= kill_step:
                    stop_group(servers[-1], signal.SIGKILL)
                    # The kill, in the trainer's elapsed-time axis: the record's time plus the time since written.
                    kill_elapsed = recs[-1]["elapsed_s"] + max(0.0, time.time() - jsonl.stat().st_mtime)
            time.sleep(0.05)
        codes = [p.poll() for p in ranks]
        if any(c != 0 for c in codes):
            tail = (work / f"rank{codes.index(next(c for c in codes if c != 0))}.log").read_text()[-800:]
            raise RuntimeError(f"{point.label}: trainer rank(s) failed (exit codes {codes}): {tail}")
    finally:
        for p in ranks:
            stop_group(p)
        for p in servers:
            stop_group(p)
    row = steady_figures(point, st, _records(work / "train" / "metrics.jsonl"), urls, rates)
    if point.kill:
        row.update(kill_figures(_records(work / "train" / "metrics.jsonl"), kill_elapsed, rates, point, st))
    row["wall_s"] = time.monotonic() - t_start
    row["steps"] = st.steps
    return row


# ------------------------------------------------------------------------------------------------ figures


def steady_figures(
    point: Point, st: Settings, recs: list[dict], urls: list[str], rates: list[float]
) -> dict[str, Any]:
    """Throughput, data wait, request shares and bytes/s over the records after the warm-up."""
    if len(recs) < 3:
        raise RuntimeError(f"{point.label}: only {len(recs)} telemetry records (metrics.jsonl)")
    warm = max(int(st.steps * st.warmup_frac), st.log_interval)
    base = max((r for r in recs if r["step"] <= warm), key=lambda r: r["step"], default=recs[0])
    kept = [r for r in recs if r["step"] > base["step"]]
    t0, s0 = base["elapsed_s"], base["run_samples"]
    last = kept[-1]
    span = last["elapsed_s"] - t0
    measured = (last["run_samples"] - s0) / span if span > 0 else float("nan")
    wait_t = sync_t = mb = 0.0
    requests = dict.fromkeys(urls, 0.0)
    prev = base
    for r in kept:
        dt = r["elapsed_s"] - prev["elapsed_s"]
        wait_t += (r.get("data_wait_frac") or 0.0) * dt
        sync_t += (r.get("sync_frac") or 0.0) * dt
        mb += (r.get("hs_mb_per_s") or 0.0) * dt
        for u, s in (r.get("servers") or {}).items():
            if u in requests:
                requests[u] += s.get("requests", 0)
        prev = r
    supply, demand = sum(rates), point.ranks * st.demand
    ideal = min(supply, demand)
    counts = list(requests.values())
    share = (max(counts) / min(counts)) if counts and min(counts) > 0 else float("inf")
    return {
        **asdict(point),
        "supply": supply,
        "demand": demand,
        "ideal": ideal,
        "measured": measured,
        "efficiency": measured / ideal,
        "data_wait": wait_t / span if span > 0 else float("nan"),
        "all_reduce": sync_t / span if span > 0 else float("nan"),
        "share_max_min": share if len(counts) > 1 else 1.0,
        "requests": counts,
        "mb_per_s": mb / span if span > 0 else float("nan"),
        "steady_s": span,
    }


def _cumulative(recs: list[dict], t: float) -> float:
    """Samples trained by time `t` (elapsed axis), linear between records."""
    prev = (0.0, 0.0)
    for r in recs:
        cur = (r["elapsed_s"], r["run_samples"])
        if cur[0] >= t:
            if cur[0] == prev[0]:
                return cur[1]
            return prev[1] + (cur[1] - prev[1]) * (t - prev[0]) / (cur[0] - prev[0])
        prev = cur
    return prev[1]


def kill_figures(
    recs: list[dict], kill_t: float | None, rates: list[float], point: Point, st: Settings
) -> dict[str, Any]:
    """Throughput before the kill, the worst 1-s bin after it (drop), and when 1-s bins reach 90% of the new ideal."""
    if kill_t is None or not recs:
        return {"kill_error": "the server was not killed (run ended first)"}
    warm_t = next(
        (r["elapsed_s"] for r in recs if r["step"] > st.steps * st.warmup_frac), recs[0]["elapsed_s"]
    )
    before = (_cumulative(recs, kill_t) - _cumulative(recs, warm_t)) / max(kill_t - warm_t, 1e-9)
    end_t = recs[-1]["elapsed_s"]
    ideal_after = min(sum(rates[:-1]), point.ranks * st.demand)
    bins = []
    t = kill_t
    while t + 1.0 <= end_t:
        bins.append(_cumulative(recs, t + 1.0) - _cumulative(recs, t))
        t += 1.0
    recovery = None
    for k in range(len(bins)):
        if all(b >= 0.9 * ideal_after for b in bins[k : k + 2]):
            recovery = float(k)
            break
    worst = min(bins[:5]) if bins else float("nan")
    done_after = _cumulative(recs, end_t) - _cumulative(recs, kill_t)
    return {
        "kill_at_s": kill_t,
        "rate_before": before,
        "ideal_after": ideal_after,
        "worst_bin_after": worst,
        "drop": 1 - worst / before if before > 0 else float("nan"),
        "recovery_s": recovery,
        "rate_after": done_after / max(end_t - kill_t, 1e-9),
        "lost_s": max(0.0, (end_t - kill_t) - done_after / ideal_after) if ideal_after > 0 else float("nan"),
    }


# ------------------------------------------------------------------------------------------------- output


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _share(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "inf"


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per point, then the kill figures."""
    head = (
        f"{'scenario':<13} {'proto':<12} {'choice':<17} {'N':>2} {'M':>2} {'N*S':>6} {'M*D':>6} {'ideal':>6} "
        f"{'measured':>8} {'eff':>6} {'wait':>6} {'a-r':>6} {'share':>5} {'MB/s':>7}"
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(
                f"{r['scenario']:<13} {r['protocol']:<12} {choice(r):<17} {r['servers']:>2} {r['ranks']:>2}  FAILED: {r['error']}"
            )
            continue
        lines.append(
            f"{r['scenario']:<13} {r['protocol']:<12} {choice(r):<17} {r['servers']:>2} {r['ranks']:>2} "
            f"{r['supply']:>6.1f} {r['demand']:>6.1f} {r['ideal']:>6.1f} {r['measured']:>8.2f} "
            f"{_pct(r['efficiency']):>6} {_pct(r['data_wait']):>6} {_pct(r['all_reduce']):>6} "
            f"{_share(r['share_max_min']):>5} {r['mb_per_s']:>7.2f}"
        )
    kills = [r for r in rows if r.get("kill") and "error" not in r]
    if kills:
        lines += ["", f"one server killed mid-run (SIGKILL at {100 * Settings.kill_frac:.0f}% of the steps)"]
        lines.append(
            f"{'balance':<17} {'N':>2} {'M':>2} {'before':>7} {'ideal after':>11} {'worst 1s':>8} {'drop':>6} {'recovery':>8} {'lost':>6}"
        )
        for r in kills:
            if "kill_error" in r:
                lines.append(f"{choice(r):<17} {r['servers']:>2} {r['ranks']:>2}  {r['kill_error']}")
                continue
            rec = f"{r['recovery_s']:.0f}s" if r["recovery_s"] is not None else "never"
            lines.append(
                f"{choice(r):<17} {r['servers']:>2} {r['ranks']:>2} {r['rate_before']:>7.2f} {r['ideal_after']:>11.1f} "
                f"{r['worst_bin_after']:>8.1f} {_pct(r['drop']):>6} {rec:>8} {r['lost_s']:>5.1f}s"
            )
    return "\n".join(lines)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The same tables in Markdown (for docs/scaling.md), with the efficiency against the control rows."""
    add_control_efficiency(rows)
    lines = [
        (
            "| scenario | protocol | choice | N | M | N*S | M*D | ideal | measured | efficiency | vs control | data wait "
            "| all-reduce | share max/min | MB/s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['scenario']} | {r['protocol']} | {choice(r)} | {r['servers']} | {r['ranks']} | FAILED |"
            )
            continue
        lines.append(
            f"| {r['scenario']} | {r['protocol']} | {choice(r)} | {r['servers']} | {r['ranks']} | {r['supply']:g} "
            f"| {r['demand']:g} | {r['ideal']:g} | {r['measured']:.2f} | {_pct(r['efficiency'])} "
            f"| {_pct(r.get('eff_ctrl', float('nan')))} | {_pct(r['data_wait'])} "
            f"| {_pct(r['all_reduce'])} | {_share(r['share_max_min'])} | {r['mb_per_s']:.2f} |"
        )
    kills = [r for r in rows if r.get("kill") and "error" not in r and "kill_error" not in r]
    if kills:
        lines += [
            "",
            "| choice | N | M | before | ideal after | worst 1 s after | drop | recovery | lost |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in kills:
            rec = f"{r['recovery_s']:.0f} s" if r["recovery_s"] is not None else "never"
            lines.append(
                f"| {choice(r)} | {r['servers']} | {r['ranks']} | {r['rate_before']:.2f} | {r['ideal_after']:g} "
                f"| {r['worst_bin_after']:.1f} | {_pct(r['drop'])} | {rec} | {r['lost_s']:.1f} s |"
            )
    return "\n".join(lines)


def default_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points users get: streaming (vLLM protocol), least-outstanding choice, no kill, no control."""
    return [
        r
        for r in rows
        if "error" not in r
        and r["protocol"] == "vllm"
        and r["balance"] == LEAST_OUTSTANDING
        and not r["kill"]
        and r["scenario"] != "control"
        and math.isfinite(r["efficiency"])
    ]


def add_control_efficiency(rows: list[dict[str, Any]]) -> None:
    """`eff_ctrl`: measured / min(supply, what M ranks reach alone here (the control row with M ranks)).

    The control rows measure the trainer side's own ceiling on this machine (step overhead, gloo all-reduce of
    M processes on a few shared cores); against it, what is left is the supply side's scheduling.
    """
    ceiling = {r["ranks"]: r["measured"] for r in rows if r.get("scenario") == "control" and "error" not in r}
    for r in rows:
        if "error" not in r and r["ranks"] in ceiling and r.get("scenario") != "control":
            r["eff_ctrl"] = r["measured"] / min(r["supply"], ceiling[r["ranks"]])


def summary_line(rows: list[dict[str, Any]]) -> str:
    """`scaling efficiency: min X% mean Y% over K points` (streaming, default server choice, no kill)."""
    effs = [r["efficiency"] for r in default_points(rows)]
    if not effs:
        return "scaling efficiency: min -% mean -% over 0 points"
    return f"scaling efficiency: min {100 * min(effs):.1f}% mean {100 * sum(effs) / len(effs):.1f}% over {len(effs)} points"


def goals_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, checked on the streaming default-choice points."""
    ok = default_points(rows)
    fed = [r for r in ok if r["supply"] >= r["demand"]]
    hom = [r for r in ok if not r["slow_server"] and not r.get("bursty") and r["servers"] > 1]
    lines = []
    if fed:
        lines.append(
            f"supply >= demand ({len(fed)} points): efficiency min {_pct(min(r['efficiency'] for r in fed))}, "
            f"data wait max {_pct(max(r['data_wait'] for r in fed))}"
        )
    ctrl = [r["eff_ctrl"] for r in ok if "eff_ctrl" in r]
    if ctrl:
        lines.append(
            f"against what the ranks reach alone on this machine (control rows): efficiency min {_pct(min(ctrl))} "
            f"mean {_pct(sum(ctrl) / len(ctrl))} over {len(ctrl)} points"
        )
    if hom:
        worst = max(hom, key=lambda r: r["share_max_min"])
        # One request more or less is 1/min(requests) of the share: say so, or a short point reads as uneven.
        fewest = min(worst.get("requests") or [0])
        lines.append(
            f"homogeneous servers: request share max/min worst {_share(worst['share_max_min'])} "
            f"({worst['servers']} servers x {worst['ranks']} ranks, {fewest:.0f} requests on the least-used server "
            "in the window: one request is "
            f"{_pct(1 / fewest) if fewest else 'all'} of it)"
        )
    return lines


def plot_heatmap(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Efficiency and data wait over servers x ranks (homogeneous streaming points) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hom = [r for r in rows if "error" not in r and r["scenario"] == "homogeneous"]
    if not hom:
        return None
    ns = sorted({r["servers"] for r in hom})
    ms = sorted({r["ranks"] for r in hom})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, title, cmap in (
        (axes[0], "efficiency", "efficiency = measured / min(N*S, M*D)", "RdYlGn"),
        (axes[1], "data_wait", "data-wait fraction", "RdYlGn_r"),
    ):
        grid = [[float("nan")] * len(ns) for _ in ms]
        for r in hom:
            grid[ms.index(r["ranks"])][ns.index(r["servers"])] = r[key]
        im = ax.imshow(
            grid,
            origin="lower",
            cmap=cmap,
            vmin=0.0 if key == "data_wait" else 0.5,
            vmax=0.5 if key == "data_wait" else 1.0,
        )
        ax.set_xticks(range(len(ns)), [str(n) for n in ns])
        ax.set_yticks(range(len(ms)), [str(m) for m in ms])
        ax.set_xlabel("servers N")
        ax.set_ylabel("trainer ranks M")
        ax.set_title(title, fontsize=10)
        for i in range(len(ms)):
            for j in range(len(ns)):
                v = grid[i][j]
                if math.isfinite(v):
                    ax.text(j, i, f"{100 * v:.0f}%", ha="center", va="center", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("scaling benchmark (stand-in servers, simulated compute)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 1,2,4,8") from None
    if not vals or any(v < 1 or v > 16 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: values must be 1..16")
    return vals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.bench.scaling", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--quick", action="store_true", help="a few points of every scenario, short runs (minutes)"
    )
    p.add_argument(
        "--servers", type=_ints, default=[1, 2, 4, 8], help="grid: server counts (default 1,2,4,8)"
    )
    p.add_argument("--ranks", type=_ints, default=[1, 2, 4, 8], help="grid: trainer ranks (default 1,2,4,8)")
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}"
    )
    p.add_argument("--rate", type=float, default=d.rate, help="S: samples/s per server")
    p.add_argument("--demand", type=float, default=d.demand, help="D: samples/s per trainer rank")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers per rank")
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per sample")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers, help="captured layers per token (aux + last)")
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per point at most (default 60, quick 40)"
    )
    p.add_argument(
        "--point-seconds", type=float, default=d.target_s,
        help=f"aim for about this much training per point (default {d.target_s:g}; longer points count more "
        "requests per server, so the request share is resolved more finely)",
    )  # fmt: skip
    p.add_argument("--service", choices=("const", "exp"), default=d.service, help="exp: bursty supply")
    p.add_argument("--point-timeout", type=float, default=d.point_timeout_s, help="seconds per point at most")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument(
        "--plot", default=None, help="heat-map PNG (default: scaling.png next to --out, else none)"
    )
    p.add_argument("--markdown", action="store_true", help="also print the tables in Markdown")
    p.add_argument(
        "--from-json", default=None, help="print the tables of an earlier --out file (runs nothing)"
    )
    p.add_argument("--work", default=None, help="keep per-point logs here (default: a temp folder, deleted)")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.demand <= 0 or args.batch_size < 1 or args.workers < 0 or args.tokens < 1:
        p.error("--rate and --demand must be > 0, --batch-size and --tokens >= 1, --workers >= 0")
    if args.steps is not None and args.steps < 10:
        p.error("--steps must be >= 10")
    if args.point_seconds <= 0:
        p.error("--point-seconds must be > 0")
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"--scenarios: unknown {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the points, print the table (progress on the way), optionally write JSON and the heat map."""
    args = parse_args(argv)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["rows"]
        print(format_markdown(rows) if args.markdown else format_table(rows))
        add_control_efficiency(rows)
        for line in goals_lines(rows):
            print(line)
        print(summary_line(rows))
        return 0
    st = Settings(
        rate=args.rate, demand=args.demand, batch_size=args.batch_size, workers=args.workers, tokens=args.tokens,
        hidden=args.hidden, layers=args.layers, steps=args.steps or (40 if args.quick else 60),
        service=args.service, point_timeout_s=args.point_timeout, target_s=args.point_seconds,
    )  # fmt: skip
    wanted = set(args.scenarios.split(","))
    points = quick_points() if args.quick else full_points(args.servers, args.ranks)
    points = [p for p in points if p.scenario in wanted]
    print(
        f"scaling benchmark: {len(points)} points, S={st.rate:g}/s per server, D={st.demand:g}/s per rank, batch "
        f"{st.batch_size}, {st.workers} workers/rank, {st.steps} steps, {st.bytes_per_sample / 1e3:.0f} KB/sample "
        f"({st.tokens} tokens x {st.layers} layers x hidden {st.hidden} bf16), {_machine()}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop every process started
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            work = (
                Path(args.work)
                if args.work
                else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scaling_")))
            )
            for i, pt in enumerate(points):
                t = time.monotonic()
                try:
                    row = run_point(pt, st, work / f"p{i:02d}")
                except RuntimeError as e:
                    row = {**asdict(pt), "error": str(e).splitlines()[0][:300]}
                rows.append(row)
                done = time.monotonic() - t0
                eta = done / (i + 1) * (len(points) - i - 1)
                fig = (
                    f"eff {_pct(row['efficiency'])} wait {_pct(row['data_wait'])}"
                    if "error" not in row
                    else "FAILED"
                )
                print(
                    f"[{i + 1}/{len(points)}] {pt.label}: {fig} ({time.monotonic() - t:.0f}s; ETA {eta:.0f}s)",
                    flush=True,
                )
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    print(format_table(rows))
    add_control_efficiency(rows)
    for line in goals_lines(rows):
        print(line)
    if args.markdown:
        print()
        print(format_markdown(rows))
    plot = Path(args.plot) if args.plot else (Path(args.out).with_name("scaling.png") if args.out else None)
    if plot is not None:
        try:
            print(f"heat map: {plot_heatmap(rows, plot)}")
        except Exception as e:  # noqa: BLE001 - a plot never costs the measured table
            print(f"heat map not drawn: {type(e).__name__}: {e}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(
            json.dumps({"settings": asdict(st), "machine": _machine(), "rows": rows}, indent=1, default=str)
        )
        os.replace(tmp, out)
    print(summary_line(rows), flush=True)
    return 1 if any("error" in r for r in rows) else 0


def _machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.node()} ({os.cpu_count()} cores, load {load:.1f})"


if __name__ == "__main__":
    sys.exit(main())
