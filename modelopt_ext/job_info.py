"""What a node entry script needs to know about a training command, as shell assignments.

    python -m modelopt_ext.job_info --config RECIPE.yaml [dotted.overrides ...] [--resume auto]

takes exactly the arguments of `python -m modelopt_ext.train`, resolves the recipe (overrides included) and
prints `NAME='value'` lines (shell-quoted) that `eval` turns into variables, so the entry script never parses
YAML in bash and the server and the trainers agree on the target, its dtype and the captured layers:

    JOB_TARGET          model.path
    JOB_DTYPE           model.dtype
    JOB_AUX_IDS         the drafter's aux layer ids, comma-separated (the recipe's, or the default rule)
    JOB_CAPTURE_IDS     aux ids followed by L (what a vLLM hidden-state server captures)
    JOB_OUTPUT_DIR      training.output_dir
    JOB_MAX_LENGTH      data.max_length
    JOB_SHARED_ROOT     data.shared_storage_root (may be empty)
    JOB_NUM_WORKERS     data.num_workers (where a rank's round-robin over the servers starts depends on it)

A bad recipe or override: one line per problem, exit 2 (same lines as the trainer would print).
"""

from __future__ import annotations

import shlex
import sys


def job_info(config: str, overrides: list[str]) -> dict[str, str]:
    """The resolved values above for a recipe plus overrides (raises ConfigError / ValueError)."""
    from modelopt_ext.config.errors import ConfigError
    from modelopt_ext.config.recipe import load_recipe
    from modelopt_ext.targets.layers import (
        capture_layer_ids,
        recipe_layer_ids,
        recipe_target_problems,
        target_num_layers,
    )
    from modelopt_ext.targets.locate import target_config

    recipe = load_recipe(config, overrides)
    problems = recipe_target_problems(recipe)
    if problems:
        raise ConfigError(problems, source=config)
    num_layers = target_num_layers(target_config(recipe.model.path, "model.path"))
    aux = recipe_layer_ids(recipe, num_layers)
    capture = capture_layer_ids(num_layers, aux)
    return {
        "JOB_TARGET": recipe.model.path,
        "JOB_DTYPE": recipe.model.dtype,
        "JOB_AUX_IDS": ",".join(map(str, aux)),
        "JOB_CAPTURE_IDS": ",".join(map(str, capture)),
        "JOB_OUTPUT_DIR": recipe.training.output_dir,
        "JOB_MAX_LENGTH": str(recipe.data.max_length),
        "JOB_SHARED_ROOT": recipe.data.shared_storage_root or "",
        "JOB_NUM_WORKERS": str(recipe.data.num_workers),
    }


def main(argv: list[str] | None = None) -> int:
    """Print the assignments; bad input is one line per problem and exit 2."""
    from modelopt_ext.config.errors import ConfigError, exit_with
    from modelopt_ext.targets.locate import TargetPathError
    from modelopt_ext.train import parse_args

    args = parse_args(argv)
    try:
        info = job_info(args.config, list(args.overrides))
    except ConfigError as e:
        exit_with(e)
    except TargetPathError as e:  # names model.path and the value
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    except (
        ValueError,
        OSError,
    ) as e:  # the target's config: no valid layer count, aux ids outside its layers
        print(f"error: {args.config}: model: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    for name, value in info.items():
        print(f"{name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
