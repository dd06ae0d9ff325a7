"""Train a drafter (EAGLE-3, DFlash, ...; the recipe's `drafter:`): `python -m modelopt_ext.train --config RECIPE.yaml [dotted.overrides ...] [--resume auto|PATH]`.

Runs as one process, or as several under `accelerate launch --multi_gpu --num_processes N` (also on CPU,
with gloo) and across nodes (`--num_machines/--machine_rank/--main_process_ip/--main_process_port`).
Bad recipes or overrides: one line per problem, exit 2. See docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml


def build_parser() -> argparse.ArgumentParser:
    """The trainer's argument contract (the launcher checks entry-script arguments against it, no torch)."""
    p = argparse.ArgumentParser(prog="python -m modelopt_ext.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="Recipe YAML (see recipes/eagle3/).")
    p.add_argument(
        "overrides", nargs="*", help="Dotted overrides, e.g. training.lr=3e-4 training.max_steps=100."
    )
    p.add_argument(
        "--resume",
        default=None,
        help="Default 'auto': continue from the last complete checkpoint in training.output_dir (fresh when "
        "it has none, refused when its checkpoints are all incomplete); 'never': start fresh, moving earlier "
        "checkpoints aside; or a checkpoint folder epoch_E_step_S/.",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load and validate the recipe, print it (redacted, rank 0), train."""
    from modelopt_ext.config.recipe import load_recipe, redacted
    from modelopt_ext.util.errors import ConfigError, exit_with

    args = parse_args(argv)
    from modelopt_ext.drafters.layers import recipe_target_problems
    from modelopt_ext.supply.sources import check_source
    from modelopt_ext.targets.locate import TargetPathError, resolve_target

    try:
        recipe = load_recipe(args.config, args.overrides)
        check_source(recipe)
        resolve_target(recipe.model.path, "model.path")  # a typo: one line here, not a loader traceback
        problems = recipe_target_problems(recipe)  # layer ids, drafter settings vs the target: before loading it
        if problems:
            raise ConfigError(problems, source=args.config)
    except TargetPathError as e:
        exit_with(ConfigError([str(e)], source=args.config))
    except ConfigError as e:
        exit_with(e)
    if os.environ.get("RANK", "0") == "0":
        print("recipe (resolved):")
        print(yaml.safe_dump(redacted(recipe.model_dump(mode="json")), sort_keys=False).rstrip())
        sys.stdout.flush()

    from modelopt_ext.supply.offline import OfflineError
    from modelopt_ext.training.checkpoint import CheckpointError
    from modelopt_ext.training.trainer import train

    try:
        result = train(recipe, resume=args.resume)
    except ConfigError as e:
        exit_with(e)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OfflineError as e:  # a corrupt dump shard: one line naming the file
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.stop_signal is not None:
        # Not finished: say so to the scheduler (a requeue then resumes from the checkpoint just written).
        return 128 + result.stop_signal
    return 0


if __name__ == "__main__":
    sys.exit(main())
