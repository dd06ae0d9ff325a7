"""CLI: export a training checkpoint as an HF folder vLLM and SGLang load as is.

    python -m modelopt_ext.export --checkpoint OUTPUT/epoch_E_step_S --out DIR [--dtype bfloat16] [--t2d]
    python -m modelopt_ext.export --latest-in OUTPUT --out DIR            # the newest COMPLETE checkpoint

A bad checkpoint (or an OUTPUT folder without a complete one) prints one line and exits 2. See docs/export.md
for the format.
"""

from __future__ import annotations

import argparse
import sys


def latest_checkpoint(output_dir: str) -> str:
    """The newest complete checkpoint in a training output folder (training/checkpoint.py decides which)."""
    from modelopt_ext.deploy.export import ExportError
    from modelopt_ext.training.checkpoint import find_latest_checkpoint, list_checkpoints

    latest = find_latest_checkpoint(output_dir)
    if latest is None:
        found = len(list_checkpoints(output_dir))
        raise ExportError(
            f"{output_dir}: no complete checkpoint to export"
            + (f" ({found} incomplete checkpoint folder(s))" if found else " (no epoch_E_step_S folder)")
        )
    print(f"export: newest complete checkpoint in {output_dir}: {latest.name}", flush=True)
    return str(latest)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, export, check the result, print where it is."""
    p = argparse.ArgumentParser(prog="python -m modelopt_ext.export", description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="A training checkpoint folder (epoch_E_step_S/).")
    which.add_argument(
        "--latest-in",
        metavar="OUTPUT_DIR",
        help="A training output folder: export its newest complete checkpoint (incomplete ones are skipped).",
    )
    p.add_argument("--out", required=True, help="Export folder (replaced atomically if it exists).")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="Cast weights (default: as trained)."
    )
    p.add_argument(
        "--t2d", action="store_true", help="Also write t2d into model.safetensors (engines skip it)."
    )
    args = p.parse_args(argv)
    # torch is imported only now, so that --help answers at once.
    from modelopt_ext.deploy.export import ExportError, check_export, drafter_of, export_checkpoint

    try:
        checkpoint = args.checkpoint or latest_checkpoint(args.latest_in)
        out = export_checkpoint(checkpoint, args.out, dtype=args.dtype, include_t2d=args.t2d)
        config = check_export(out)
        layers = drafter_of(out).layer_ids_of(config)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"export: {out} ({config['architectures'][0]}, draft vocab {config['draft_vocab_size']}/"
        f"{config['vocab_size']}, aux layers {layers} (vLLM numbering), {config['torch_dtype']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
