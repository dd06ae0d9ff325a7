"""Disk cost of a supervision dump: `python -m modelopt_ext.bench.offline_bytes [--dump DIR ...] [--tokens N]`.

Prints bytes per token and per sample, bf16 vs fp32, for the target shapes below (computed with the dump's
own `token_bytes`, the rule the dump command checks free disk space with) and, for every `--dump` folder,
what that dump measured on disk (its index). The per-sample figure assumes `--tokens` tokens per sample.
For comparison it also prints what full-vocabulary logits or draft-vocabulary probabilities would cost.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modelopt_ext.drafters import builtin_drafters
from modelopt_ext.supply.offline import INDEX, token_bytes

# (hidden size, decoder layers, vocabulary) of the targets' text models (their config.json).
SHAPES = {
    "tiny (tests, examples/local)": (128, 4, 1024),
    "Qwen3-8B": (4096, 36, 151936),
    "Kimi-K2.5": (7168, 61, 163840),
}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def rows(tokens: int, draft_vocab: int) -> list[str]:
    """One line per target shape and storage dtype."""
    out = []
    for name, (h, layers, vocab) in SHAPES.items():
        for drafter in builtin_drafters():  # each drafter's default layers for this target
            aux = drafter.default_layer_ids(layers, drafter.Settings())
            for dtype in ("bfloat16", "float32"):
                plan = {
                    "target": {"hidden_size": h},
                    "aux_layer_ids": aux,
                    "storage_dtype": dtype,
                    "target_form": "target_last_hidden",
                }
                per_tok = token_bytes(plan)
                out.append(
                    f"{name:30s} {drafter.name:7s} {dtype:9s} {len(aux)} aux + last x H={h}: {per_tok:>7d} "
                    f"B/token, {_human(per_tok * tokens)}/sample"
                )
        logits = vocab * 4
        probs = min(draft_vocab, vocab) * 4
        out.append(
            f"{'':30s} (instead of the last hidden state: full fp32 logits {_human(logits)}/token, "
            f"draft-vocab probs {_human(probs)}/token)"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the table (and the measured dumps)."""
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.bench.offline_bytes", description=__doc__.splitlines()[0]
    )
    p.add_argument("--tokens", type=int, default=2048, help="Tokens per sample for the computed rows.")
    p.add_argument("--draft-vocab", type=int, default=32000)
    p.add_argument("--dump", action="append", default=[], help="A dump folder to report (repeatable).")
    args = p.parse_args(argv)
    print(f"supervision dump size, computed ({args.tokens} tokens/sample):")
    for line in rows(args.tokens, args.draft_vocab):
        print(f"  {line}")
    for d in args.dump:
        idx = json.loads((Path(d) / INDEX).read_text())
        print(
            f"measured {d}: {idx['storage_dtype']}, {idx['num_samples']} samples, {_human(idx['bytes'])} "
            f"on disk, {_human(idx['bytes_per_sample'])}/sample"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
