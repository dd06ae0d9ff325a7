"""The run report: `OUTPUT/metrics.json` (totals and final metrics), a one-screen summary, the starvation verdict.

A run is STARVED when its trainers spent more than `STARVED_FRAC` of their time waiting for data. With
hidden-state servers (streaming / remote) that means supply is the bottleneck: the verdict compares supply
(tokens/s the servers delivered) with demand (tokens/s the trainers could consume with no wait: tokens over
their non-waiting time) and suggests more serve nodes or more fetch concurrency.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from modelopt_ext.telemetry.meter import IN_PROCESS, PREFETCHED, REMOTE, Totals, human_bytes, short_url
from modelopt_ext.telemetry.sizing import rates_from_metrics, size_for_plan
from modelopt_ext.util.fileio import write_json_atomic, write_text_atomic

STARVED_FRAC = 0.30  # data wait above this share of step time: the trainers are starved
TARGET_HEAVY_FRAC = 0.50  # in-process target forward above this share: worth offloading to serve nodes


def build_metrics(
    totals: Totals,
    *,
    kind: str,
    global_step: int,
    start_step: int,
    total_steps: int,
    samples: float,
    tokens: float,
    wall_s: float,
    final_metrics: dict[str, float],
    num_workers: int = 0,
    checkpoint: str | os.PathLike | None = None,
    export: str | os.PathLike | None = None,
    stopped_early: bool = False,
) -> dict[str, Any]:
    """The content of metrics.json.

    `samples`, `tokens`, `wall_s` are this process's run totals as the progress tracker counts them (the same
    counts as metrics.jsonl's `run_samples`/`run_tokens`); `totals` (the meter, summed over ranks) gives the
    time split, bytes and servers.
    """
    # Supply: tokens delivered per second of the training loop; demand: per second of NOT waiting.
    supply = totals.supply_tokens_per_s()
    demand = totals.demand_tokens_per_s()
    m: dict[str, Any] = {
        "steps": global_step,
        "steps_this_run": global_step - start_step,
        "total_steps": total_steps,
        "stopped_early": stopped_early,
        "world_size": totals.ranks,
        "source": kind,
        "num_workers": num_workers,
        "samples": samples,
        "tokens": tokens,
        "wall_time_s": wall_s,
        "samples_per_s": samples / wall_s if wall_s > 0 else float("nan"),
        "tokens_per_s": tokens / wall_s if wall_s > 0 else float("nan"),
        "data_wait_frac": totals.data_wait_frac,
        "startup_s": totals.startup_s / max(totals.ranks, 1),
        "supply_frac": totals.supply_frac,
        "sync_frac": totals.sync_frac,
        "hs_bytes": totals.hs_bytes,
        "hs_mb_per_s": totals.rate(totals.hs_bytes) / 1e6,
        "hs_bytes_per_sample": totals.hs_bytes / totals.samples if totals.samples else float("nan"),
        "supply_tokens_per_s": supply,
        "demand_tokens_per_s": demand,
        "servers": totals.server_summary(),
        "final": dict(final_metrics),
        "sim_accept_len": final_metrics.get("sim_accept_len", float("nan")),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "export": str(export) if export else None,
    }
    m["starved"] = is_starved(m)
    return m


def is_starved(m: dict[str, Any]) -> bool:
    """Did the trainers wait for data more than STARVED_FRAC of the time?"""
    wait = m.get("data_wait_frac")
    return _real(wait) and wait > STARVED_FRAC


def verdict(m: dict[str, Any]) -> list[str]:
    """Lines saying whether supply kept up, and what to change when it did not."""
    wait, kind = m.get("data_wait_frac", float("nan")), m.get("source")
    n_servers, workers = len(m.get("servers") or {}), m.get("num_workers", 0)
    if not is_starved(m):
        lines = [f"verdict: supply kept up (data wait {_pct(wait)}, threshold {_pct(STARVED_FRAC)})"]
        supply_frac = m.get("supply_frac")
        if kind == IN_PROCESS and _real(supply_frac) and supply_frac > TARGET_HEAVY_FRAC:
            lines.append(
                f"  the in-process target forward takes {_pct(supply_frac)} of step time: streaming from serve "
                "nodes (data.mode: streaming) would give that time back to training"
            )
        return lines
    supply, demand = m.get("supply_tokens_per_s"), m.get("demand_tokens_per_s")
    ratio = demand / supply if _real(supply) and supply > 0 and _real(demand) else float("nan")
    if kind in (REMOTE, PREFETCHED):
        advice = sizing(m)
        need = advice.servers_needed if advice is not None else None
        more_servers = f"more serve nodes (SERVE_NODES, now {n_servers}" + (
            f"; about {need} to keep up)" if need else ")"
        )
        more_workers = (
            f", or more fetch concurrency (STREAMING_NUM_WORKERS / data.num_workers, now {workers}) "
            "while the servers' latency stays flat"
            if kind == PREFETCHED
            else ""
        )
        return [
            (
                f"verdict: STARVED - the trainers waited for hidden states {_pct(wait)} of the time "
                f"(threshold {_pct(STARVED_FRAC)}): supply is the bottleneck"
            ),
            (
                f"  supply {_num(supply, ',.0f')} tok/s delivered by {n_servers} server(s) vs demand "
                f"{_num(demand, ',.0f')} tok/s the trainers could consume ({_num(ratio, '.1f')}x)"
            ),
            f"  suggestion: {more_servers}{more_workers}",
        ]
    return [
        (
            f"verdict: STARVED - the trainers waited for batches {_pct(wait)} of the time "
            f"(threshold {_pct(STARVED_FRAC)}): data loading is the bottleneck"
        ),
        (
            f"  supply {_num(supply, ',.0f')} tok/s vs demand {_num(demand, ',.0f')} tok/s "
            f"({_num(ratio, '.1f')}x); suggestion: more DataLoader workers (data.num_workers, now {workers})"
        ),
    ]


def sizing(m: dict[str, Any]):
    """The sizing rule (telemetry/sizing.py) on a run's figures: supply per server, demand per trainer rank.

    None without servers or figures. A run that was not starved did not saturate its servers: its supply per
    server is a lower bound, and the advice an upper bound.
    """
    if m.get("source") not in (REMOTE, PREFETCHED):
        return None
    rates = rates_from_metrics(m, saturated=is_starved(m))
    return None if rates is None else size_for_plan(rates, rates.ranks)


def summary_lines(m: dict[str, Any]) -> list[str]:
    """The telemetry part of the closing summary (a few lines; one per server)."""
    kind = m.get("source")
    split = f"data wait {_pct(m.get('data_wait_frac'))}"
    if int(m.get("world_size") or 1) > 1:
        split += f" | all-reduce {_pct(m.get('sync_frac'))}"
    if kind == IN_PROCESS:
        split += f" | target forward {_pct(m.get('supply_frac'))}"
    lines = [
        (
            f"  time: {split} of {m.get('world_size', 1)} trainer(s)' step time ({kind} supervision; "
            f"start-up {_num(m.get('startup_s'), '.1f')}s not counted)"
        ),
        f"  hidden states: {_bytes(_div(m.get('hs_mb_per_s'), 1e-6))}/s, "
        f"{_bytes(m.get('hs_bytes_per_sample'))}/sample, {_bytes(m.get('hs_bytes'))} in all"
        + (" (produced in-process)" if kind == IN_PROCESS else ""),
    ]
    for url, s in (m.get("servers") or {}).items():
        lines.append(
            f"  server {short_url(url)}: {s['requests']} req, {s['errors']} err, {s['down_events']} outage(s), "
            f"latency mean {_ms(s['lat_mean_ms'])} p50 {_ms(s['lat_p50_ms'])} p95 {_ms(s['lat_p95_ms'])}, "
            f"{_bytes(_div(s['mb'], 1e-6))}"
        )
    lines += ["  " + line for line in verdict(m)]
    advice = sizing(m)
    if advice is not None:
        lines.append("  " + advice.line("tok/s", servers_now=len(m.get("servers") or {})))
    return lines


def write_metrics_json(path: Path, obj: Any) -> None:
    """JSON with NaN/inf written as null (strict JSON readers choke on NaN), atomically."""
    write_json_atomic(path, _finite(obj), sort_keys=True)


def write_report(out_dir: str | os.PathLike, metrics: dict[str, Any], summary_text: str) -> dict[str, Path]:
    """metrics.json, summary.txt and training.png (from metrics.jsonl) in `out_dir`; the paths written.

    The plot is best effort: a failure to draw it is reported in one line, never fails the run.
    """
    from modelopt_ext.telemetry.plot import plot_training

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"metrics": out / "metrics.json", "summary": out / "summary.txt"}
    write_metrics_json(written["metrics"], metrics)
    write_text_atomic(
        written["summary"], summary_text if summary_text.endswith("\n") else summary_text + "\n"
    )
    try:
        plot_training(out / "metrics.jsonl", out / "training.png")
        written["plot"] = out / "training.png"
    except Exception as e:  # noqa: BLE001 - a plot must never cost a finished run
        print(f"telemetry: plot not written: {type(e).__name__}: {e}", flush=True)
    return written


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _real(x: Any) -> bool:
    """A finite number (not None, NaN or inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _bytes(x: Any) -> str:
    return human_bytes(x) if _real(x) else "?"


def _div(x: Any, d: float) -> float:
    return x / d if _real(x) else float("nan")


def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if _real(x) else "?"


def _pct(x: Any) -> str:
    return f"{100 * x:.0f}%" if _real(x) else "?"


def _ms(x: Any) -> str:
    if not _real(x):
        return "-"
    return f"{x:.0f}ms" if x < 10_000 else f"{x / 1000:.1f}s"
