"""Human side of an acceptance measurement: the chain-length table and the PNG plot.

Reads the JSON-ready dicts that `specdec_bench` writes (`BenchResult.to_dict()` plus its `sampled` and
`sweep` entries); the drafter kind plays no part.
"""

from __future__ import annotations

import os
from pathlib import Path

from modelopt_ext.util.fileio import write_figure_atomic


def sweep_table(sweep: list[dict]) -> str:
    """Acceptance and speed for each chain length k (one row per k), fixed-width text."""
    rows = ["   k  accept len  tokens/s  speedup  acceptance per draft position"]
    for r in sweep:
        pos = " ".join(f"{a:.2f}" for a in r["acceptance_per_position"])
        rows.append(
            f"{r['num_steps']:4d}  {r['mean_acceptance_length']:10.3f}  {r['tokens_per_s_speculative']:8.1f}"
            f"  {r['speedup']:6.2f}x  {pos}"
        )
    return "\n".join(rows)


def plot_acceptance(result: dict, out_png: str | os.PathLike, title: str | None = None) -> Path:
    """Per-position acceptance (greedy and, if measured, sampled) and, with a sweep, acceptance length and
    tokens/s against k; written atomically (temp + rename)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    sweep = result.get("sweep") or []
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(12 if sweep else 6.5, 4.5), squeeze=False)
    try:
        ax = axes[0][0]
        runs = [("greedy", result)]
        if result.get("sampled"):
            s = result["sampled"]
            runs.append((f"T={s['temperature']:g}, top-p={s['top_p']:g}", s))
        width = 0.8 / len(runs)
        for j, (label, r) in enumerate(runs):
            pos = r["acceptance_per_position"]
            xs = [i + 1 + (j - (len(runs) - 1) / 2) * width for i in range(len(pos))]
            ax.bar(xs, pos, width=width, label=f"{label}: accept len {r['mean_acceptance_length']:.2f}")
        ax.set_xlabel("draft position")
        ax.set_ylabel("fraction of rounds accepted")
        ax.set_ylim(0, 1)
        ax.set_xticks(range(1, len(result["acceptance_per_position"]) + 1))
        ax.set_title(f"acceptance per position (k={result['num_steps']})")
        ax.legend(fontsize=8)
        if sweep:
            ax = axes[0][1]
            ks = [r["num_steps"] for r in sweep]
            ax.plot(ks, [r["mean_acceptance_length"] for r in sweep], marker="o", color="tab:blue")
            ax.set_xlabel("chain length k (num_speculative_tokens)")
            ax.set_ylabel("acceptance length", color="tab:blue")
            ax.set_xticks(ks)
            ax2 = ax.twinx()
            ax2.plot(ks, [r["tokens_per_s_speculative"] for r in sweep], marker="s", color="tab:orange")
            base = sweep[0]["tokens_per_s_baseline"]
            ax2.axhline(base, color="tab:orange", linestyle=":", label=f"target alone {base:.0f} tok/s")
            ax2.set_ylabel("tokens/s with the drafter", color="tab:orange")
            ax2.set_ylim(bottom=0)
            ax2.legend(fontsize=8, loc="lower right")
            ax.set_title("chain-length sweep")
        fig.suptitle(title or f"{result.get('prompt_set', 'prompts')}", fontsize=10)
        fig.tight_layout()
        out = write_figure_atomic(fig, out_png)
    finally:
        plt.close(fig)
    return out
