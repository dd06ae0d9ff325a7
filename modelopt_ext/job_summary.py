"""One-screen summary of a finished drafter job: where the drafter is, how well it drafts, how to serve it.

    python -m modelopt_ext.job_summary --output TRAIN_OUTPUT_DIR --target TARGET [--bench BENCH.json]
                                       [--notes NOTES.txt] [--write SUMMARY.txt]

Reads `OUTPUT/metrics.jsonl` (the trainer's progress records), the export folder `OUTPUT/export/`, the
benchmark result written by `modelopt_ext.specdec_bench --out`, and optional notes (one line each, e.g. what
a preparation step reused). Prints the summary and, with `--write`, also writes it atomically.
Missing output folder or export: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from modelopt_ext.fileio import write_text_atomic


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


def render_summary(output: Path, target: str, bench: dict | None, notes: list[str]) -> str:
    """The summary text."""
    export = output / "export"
    m = _last_metrics(output)
    lines = ["=" * 72, "EAGLE-3 drafter: summary", "=" * 72]
    lines.append(f"drafter (export, loads in vLLM/SGLang): {export}")
    ckpts = sorted(output.glob("epoch_*_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[-1]))
    if ckpts:
        lines.append(f"last training checkpoint:               {ckpts[-1]}")
    if m:
        accs = " ".join(f"{m[k]:.2f}" for k in sorted(m) if k.startswith("acc_"))
        lines.append(
            f"training: {m.get('step')} steps, loss {m.get('loss', float('nan')):.3f}, acc per TTT step [{accs}], "
            f"sim accept len {m.get('sim_accept_len', float('nan')):.3f}"
        )
        lines.append(
            f"training throughput: {m.get('samples_per_s', 0.0):.2f} samples/s, {m.get('tokens_per_s', 0.0):.0f} tokens/s"
        )
    if bench:
        lines.append(
            f"acceptance length (specdec_bench, {bench.get('num_prompts')} prompts, k={bench.get('num_steps')}): "
            f"{bench['mean_acceptance_length']:.3f}"
        )
        if "tokens_per_s_speculative" in bench:
            lines.append(
                f"decode throughput: {bench['tokens_per_s_speculative']:.1f} tokens/s with the drafter, "
                f"{bench.get('tokens_per_s_baseline', 0.0):.1f} without ({bench.get('speedup', 0.0):.2f}x)"
            )
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
    p.add_argument("--notes", help="A text file of extra lines (e.g. what was reused).")
    p.add_argument("--write", help="Also write the summary to this file.")
    args = p.parse_args(argv)
    output = Path(args.output)
    if not (output / "export" / "config.json").is_file():
        print(f"error: --output {output}: no export/config.json (did training finish?)", file=sys.stderr)
        return 2
    bench = None
    if args.bench:
        try:
            bench = json.loads(Path(args.bench).read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: --bench {args.bench}: {e}", file=sys.stderr)
            return 2
    notes = []
    if args.notes and Path(args.notes).is_file():
        notes = [ln for ln in Path(args.notes).read_text().splitlines() if ln.strip()]
    text = render_summary(output, args.target, bench, notes)
    sys.stdout.write(text)
    if args.write:
        write_text_atomic(Path(args.write), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
