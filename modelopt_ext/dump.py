"""Dump supervision for a conversations file: `python -m modelopt_ext.dump --config RECIPE.yaml --out DIR [overrides]`.

The source is the recipe's: the target in this process (colocated), vLLM hidden-state servers
(`data.server_urls`, streaming) or serve_target (`data.mode=remote`, draft-vocabulary probabilities). Default --out: <training.output_dir>/supervision. Shards
are spread over processes (`--rank/--world-size`, default RANK/WORLD_SIZE as torchrun and the launcher set
them): process r writes shards r, r + W, ... A restarted dump skips finished shards; the last process to finish
writes index.json. Train from the folder with `data.offline_dir=DIR` (docs/offline.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from modelopt_ext.supply.offline import STORAGE_DTYPES, OfflineError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m modelopt_ext.dump", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="Recipe YAML: the target, the data and the source.")
    p.add_argument(
        "--out",
        default=None,
        help="The dump folder (created; a finished part is kept on rerun). Default: <training.output_dir>/supervision.",
    )
    p.add_argument(
        "--dtype", default="bfloat16", choices=sorted(STORAGE_DTYPES), help="Stored hidden-state dtype."
    )
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1, help="Samples per target forward (colocated/remote).")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", "0")))
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    p.add_argument("--resume", default=None, help="Accepted for the entry scripts; a dump always resumes.")
    p.add_argument("overrides", nargs="*", help="Dotted recipe overrides, e.g. data.path=other.jsonl.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run a dump; bad input is one line (exit 2), a failed write one line (exit 1)."""
    from modelopt_ext.config.recipe import load_recipe
    from modelopt_ext.training.dump import dump_supervision
    from modelopt_ext.util.errors import ConfigError, exit_with

    args = parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
        dump_supervision(
            recipe,
            args.out or Path(recipe.training.output_dir) / "supervision",
            dtype=args.dtype,
            samples_per_shard=args.samples_per_shard,
            rank=args.rank,
            world_size=args.world_size,
            batch_size=args.batch_size,
        )
    except ConfigError as e:
        exit_with(e)
    except OfflineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0



if __name__ == "__main__":
    sys.exit(main())
