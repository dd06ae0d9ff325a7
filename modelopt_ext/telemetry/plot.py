"""`OUTPUT/training.png` from `OUTPUT/metrics.jsonl`: loss, accuracy per drafted token, throughput, data wait over steps.

Drawn with matplotlib's Agg backend (no display needed). Tolerant by design: missing fields leave a panel
saying so, unreadable lines are skipped, a 1-step run draws points instead of lines. CLI:
`python -m modelopt_ext.telemetry.plot OUTPUT_DIR` (re)draws the plot of a run folder.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from modelopt_ext.util.fileio import write_figure_atomic

PANELS = ("loss", "accuracy per drafted token", "throughput", "data wait / hidden states")


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl (bad lines skipped; a missing file -> [])."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(records):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            x = r.get("step", i + 1)
            xs.append(float(x) if isinstance(x, (int, float)) else float(i + 1))
            ys.append(float(v))
    return xs, ys


def _window_rates(records: list[dict], key: str, fallback: str) -> tuple[list[float], list[float], str]:
    """Per-window rate of a run counter (`run_samples` / `run_tokens` over `elapsed_s`), which shows dips the
    cumulative mean hides; falls back to the cumulative `fallback` field when the counters are missing.
    A resumed run restarts its counters: its first record is rated from zero."""
    xs, ys, prev = [], [], (0.0, 0.0)
    for r in records:
        n, t, step = r.get(key), r.get("elapsed_s"), r.get("step")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (n, t, step)):
            return (*_series(records, fallback), "since start")
        if n < prev[0] or t < prev[1]:
            prev = (0.0, 0.0)
        if t > prev[1]:
            xs.append(float(step))
            ys.append((n - prev[0]) / (t - prev[1]))
        prev = (n, t)
    return xs, ys, "per window"


def _step_keys(records: list[dict], prefix: str) -> list[str]:
    keys = {k for r in records for k in r if k.startswith(prefix) and k[len(prefix) :].isdigit()}
    return sorted(keys, key=lambda k: int(k[len(prefix) :]))


def _draw(ax, xs, ys, label, **kw) -> bool:
    if not xs:
        return False
    ax.plot(xs, ys, marker="o" if len(xs) < 3 else None, markersize=4, label=label, **kw)
    return True


def plot_training(
    metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike, title: str | None = None
) -> list[str]:
    """Draw the 2x2 figure into `out_png` (temp + rename); returns the panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = read_records(metrics_jsonl)
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), constrained_layout=True)
    (ax_loss, ax_acc), (ax_tp, ax_wait) = axes
    try:
        drawn = [_draw(ax_loss, *_series(records, "loss"), "loss (weighted)", color="black", linewidth=2)]
        for k in _step_keys(records, "loss_"):
            drawn.append(_draw(ax_loss, *_series(records, k), f"step {k[5:]}", alpha=0.7))
        _finish(ax_loss, PANELS[0], "loss", any(drawn))

        drawn = [
            _draw(ax_acc, *_series(records, k), f"draft {k[4:]}") for k in _step_keys(records, "acc_")
        ]
        _finish(ax_acc, PANELS[1], "top-1 accuracy", any(drawn))
        if any(drawn):
            ax_acc.set_ylim(0, 1)
        sal = _series(records, "sim_accept_len")
        if sal[0]:
            ax_sal = ax_acc.twinx()
            ax_sal.plot(*sal, color="gray", linestyle="--", marker="o" if len(sal[0]) < 3 else None)
            ax_sal.set_ylabel("sim. acceptance length (dashed)", color="gray")

        sx, sy, how = _window_rates(records, "run_samples", "samples_per_s")
        ok = _draw(ax_tp, sx, sy, "samples/s", color="tab:blue")
        tx, ty, _ = _window_rates(records, "run_tokens", "tokens_per_s")
        if tx:
            ax_tok = ax_tp.twinx()
            ax_tok.plot(tx, ty, color="tab:orange", marker="o" if len(tx) < 3 else None)
            ax_tok.set_ylabel("tokens/s", color="tab:orange")
            ax_tok.set_ylim(bottom=0)
        _finish(ax_tp, f"{PANELS[2]} ({how})", "samples/s", ok or bool(tx), legend=False)
        if ok:
            ax_tp.set_ylim(bottom=0)
            ax_tp.set_ylabel("samples/s", color="tab:blue")

        wait = _series(records, "data_wait_frac")
        ok = _draw(ax_wait, wait[0], [100 * y for y in wait[1]], "data wait %", color="tab:red")
        sup = _series(records, "supply_frac")
        if not any(sup[1]):  # only a colocated run has an in-process target forward
            sup = ([], [])
        ok = _draw(ax_wait, sup[0], [100 * y for y in sup[1]], "target forward %", color="tab:purple") or ok
        if ok:
            ax_wait.axhline(30, color="tab:red", linestyle=":", linewidth=1, label="starved above")
            ax_wait.set_ylim(0, 100)
        mbs = _series(records, "hs_mb_per_s")
        if mbs[0]:
            ax_mb = ax_wait.twinx()
            ax_mb.plot(*mbs, color="tab:green", marker="o" if len(mbs[0]) < 3 else None)
            ax_mb.set_ylabel("hidden states MB/s", color="tab:green")
            ax_mb.set_ylim(bottom=0)
        _finish(ax_wait, PANELS[3], "% of step time", ok or bool(mbs[0]))

        fig.suptitle(title or f"{Path(metrics_jsonl).parent.name}: {len(records)} log record(s)")
        write_figure_atomic(fig, out_png)
    finally:
        plt.close(fig)
    return list(PANELS)


def _finish(ax, title: str, ylabel: str, has_data: bool, legend: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not has_data:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def main(argv: list[str] | None = None) -> int:
    """CLI: draw OUTPUT_DIR/training.png from OUTPUT_DIR/metrics.jsonl."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m modelopt_ext.telemetry.plot", description=main.__doc__)
    p.add_argument("output_dir", help="a training output folder (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default OUTPUT_DIR/training.png)")
    a = p.parse_args(argv)
    src = Path(a.output_dir) / "metrics.jsonl"
    if not src.is_file():
        print(f"{src}: no such file (not a training output folder?)", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else Path(a.output_dir) / "training.png"
    plot_training(src, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
