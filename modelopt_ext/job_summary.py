"""One-screen summary of a finished drafter job: where the drafter is, how well it drafts, how to serve it.

    python -m modelopt_ext.job_summary --output TRAIN_OUTPUT_DIR --target TARGET [--bench BENCH.json]
        [--engine ENGINE.json ...] [--gate-threshold 0.10] [--notes NOTES.txt] [--write SUMMARY.txt]

Reads `OUTPUT/metrics.jsonl` (the trainer's progress records), the export folder `OUTPUT/export/`, the
benchmark result written by `modelopt_ext.specdec_bench --out`, the serving engines' records
(`python -m modelopt_ext.acceptance.engines --json`), and optional notes (one line each, e.g. what a
preparation step reused). Prints the acceptance lengths side by side (trainer simulation, specdec_bench,
each engine: modelopt_ext/acceptance/gate.py) and the gate's verdict, and, with `--write`, also writes the
summary atomically. Exit 1 when the gate fails (after printing and writing the summary); missing output
folder or export, or an unreadable record: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from modelopt_ext.acceptance.gate import DEFAULT_THRESHOLD, Verdict, acceptance_lines, gate
from modelopt_ext.acceptance.report import sweep_table
from modelopt_ext.util.fileio import write_text_atomic


def _last_metrics(output: Path) -> dict:
    """The trainer's last progress record (empty when there is none)."""
    path = output / "metrics.jsonl"
    if not path.is_file():
        return {}
    last: dict = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                last = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
    return last


def render_summary(
    output: Path,
    target: str,
    bench: dict | None,
    notes: list[str],
    engines: list[dict] | None = None,
    verdicts: list[Verdict] | None = None,
) -> str:
    """The summary text."""
    export = output / "export"
    m = _last_metrics(output)
    lines = ["=" * 72, "drafter job: summary", "=" * 72]
    lines.append(f"drafter (export, loads in vLLM/SGLang): {export}")
    from modelopt_ext.training.checkpoint import find_latest_checkpoint

    latest = find_latest_checkpoint(output)
    if latest is not None:
        lines.append(f"last training checkpoint:               {latest}")
    if m:
        accs = " ".join(f"{m[k]:.2f}" for k in sorted(m) if k.startswith("acc_"))
        lines.append(
            f"training: {m.get('step')} steps, loss {m.get('loss', float('nan')):.3f}, acc per TTT step [{accs}], "
            f"sim accept len {m.get('sim_accept_len', float('nan')):.3f}"
        )
        lines.append(
            f"training throughput: {m.get('samples_per_s', 0.0):.2f} samples/s, {m.get('tokens_per_s', 0.0):.0f} tokens/s"
        )
    if bench or engines:
        lines.extend(acceptance_lines(m, bench, engines or []))
    lines.extend(v.line for v in verdicts or [])
    if bench and "tokens_per_s_speculative" in bench:
        lines.append(
            f"decode throughput: {bench['tokens_per_s_speculative']:.1f} tokens/s with the drafter, "
            f"{bench.get('tokens_per_s_baseline', 0.0):.1f} without ({bench.get('speedup', 0.0):.2f}x)"
        )
    if bench and bench.get("sweep"):
        lines.append(f"chain-length sweep (specdec_bench, greedy, {bench.get('prompt_set')}):")
        lines.extend("  " + row for row in sweep_table(bench["sweep"]).splitlines())
    lines.append("serve it:")
    t, d = shlex.quote(target), shlex.quote(str(export))
    lines.append(f"  vLLM:   python -m modelopt_ext.serve_vllm --target {t} --draft {d} --print-only")
    lines.append(f"  SGLang: python -m modelopt_ext.serve_sglang --target {t} --draft {d} --print-only")
    lines.extend(notes)
    lines.append("=" * 72)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print (and optionally write) the summary."""
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.job_summary", description=__doc__.splitlines()[0]
    )
    p.add_argument("--output", required=True, help="The training output folder (training.output_dir).")
    p.add_argument("--target", required=True, help="The target model (for the serve commands).")
    p.add_argument("--bench", help="specdec_bench's JSON result.")
    p.add_argument(
        "--engine", action="append", default=[], help="A serving engine's acceptance record (repeatable)."
    )
    p.add_argument(
        "--gate-threshold", type=float, default=DEFAULT_THRESHOLD,
        help="Fail when an engine's acceptance length is more than this fraction below specdec_bench's.",
    )  # fmt: skip
    p.add_argument("--notes", help="A text file of extra lines (e.g. what was reused).")
    p.add_argument("--write", help="Also write the summary to this file.")
    args = p.parse_args(argv)
    output = Path(args.output)
    if not (output / "export" / "config.json").is_file():
        print(f"error: --output {output}: no export/config.json (did training finish?)", file=sys.stderr)
        return 2
    if not 0.0 <= args.gate_threshold < 1.0:
        print(f"error: --gate-threshold {args.gate_threshold}: must be in [0, 1)", file=sys.stderr)
        return 2
    records = []
    for opt, path in [("--bench", args.bench)] * bool(args.bench) + [("--engine", e) for e in args.engine]:
        try:
            records.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: {opt} {path}: {e}", file=sys.stderr)
            return 2
    bench = records.pop(0) if args.bench else None
    notes = []
    if args.notes and Path(args.notes).is_file():
        notes = [ln for ln in Path(args.notes).read_text().splitlines() if ln.strip()]
    verdicts = gate(_last_metrics(output), bench, records, args.gate_threshold) if records else []
    text = render_summary(output, args.target, bench, notes, records, verdicts)
    sys.stdout.write(text)
    if args.write:
        write_text_atomic(Path(args.write), text)
    failed = [v.line for v in verdicts if not v.ok]
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
