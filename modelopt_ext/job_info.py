"""What a node entry script needs to know about a training command, as shell assignments.

    python -m modelopt_ext.job_info [--capture-ids IDS] --config RECIPE.yaml [dotted.overrides ...] [--resume auto]

takes the arguments of `python -m modelopt_ext.train` (plus `--capture-ids`, the layer ids the servers should
capture, e.g. the entry script's EAGLE_CAPTURE_IDS), resolves the recipe (overrides included) and prints
`NAME='value'` lines (shell-quoted) that `eval` turns into variables, so the entry script never parses YAML or
checks layer ids in bash, and the servers and the trainers agree on the target, its dtype and the layers:

    JOB_TARGET          model.path
    JOB_DTYPE           model.dtype
    JOB_AUX_IDS         the layers the recipe's drafter reads, comma-separated (serve_target --aux-layer-ids)
    JOB_CAPTURE_IDS     those followed by L (what a vLLM hidden-state server captures: --capture-ids)
    JOB_LAYER_OVERRIDE  the trainer override that makes the trainers read what the servers capture
                        (`model.aux_layer_ids=[...]` with --capture-ids; empty without)
    JOB_OUTPUT_DIR      training.output_dir
    JOB_MAX_LENGTH      data.max_length
    JOB_SHARED_ROOT     data.shared_storage_root (may be empty)

Layer ids are resolved and validated by modelopt_ext.targets.layers (the one owner); the script forwards them.
A bad recipe, override or capture id list: one line per problem, exit 2 (the lines the trainer would print).
"""

from __future__ import annotations

import argparse
import shlex
import sys


class CaptureIdsError(ValueError):
    """`--capture-ids` does not fit the target (the message names the ids and the rule)."""


def job_info(config: str, overrides: list[str], capture_ids: str | None = None) -> dict[str, str]:
    """The resolved values above for a recipe plus overrides, and optionally the servers' capture ids
    (text in any form `parse_capture_ids` reads). Raises ConfigError / ValueError (CaptureIdsError for
    capture ids that do not fit the target)."""
    from modelopt_ext.config.recipe import load_recipe
    from modelopt_ext.drafters.layers import recipe_layer_ids, recipe_target_problems
    from modelopt_ext.targets.layers import (
        capture_layer_ids,
        check_capture_ids,
        drafter_ids_of_capture,
        parse_capture_ids,
        target_num_layers,
    )
    from modelopt_ext.targets.locate import target_config
    from modelopt_ext.util.errors import ConfigError

    recipe = load_recipe(config, overrides)
    problems = recipe_target_problems(recipe)
    if problems:
        raise ConfigError(problems, source=config)
    num_layers = target_num_layers(target_config(recipe.model.path, "model.path"))
    layer_override = ""
    if capture_ids is not None:
        try:
            wanted = drafter_ids_of_capture(check_capture_ids(num_layers, parse_capture_ids(capture_ids)))
        except ValueError as e:
            raise CaptureIdsError(f"--capture-ids {capture_ids!r}: {e}") from None
        layer_override = f"model.aux_layer_ids=[{','.join(map(str, wanted))}]"
        recipe = load_recipe(config, [*overrides, layer_override])  # what the trainers will see
    aux = recipe_layer_ids(recipe, num_layers)
    capture = capture_layer_ids(num_layers, aux)
    return {
        "JOB_TARGET": recipe.model.path,
        "JOB_DTYPE": recipe.model.dtype,
        "JOB_AUX_IDS": ",".join(map(str, aux)),
        "JOB_CAPTURE_IDS": ",".join(map(str, capture)),
        "JOB_LAYER_OVERRIDE": layer_override,
        "JOB_OUTPUT_DIR": recipe.training.output_dir,
        "JOB_MAX_LENGTH": str(recipe.data.max_length),
        "JOB_SHARED_ROOT": recipe.data.shared_storage_root or "",
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The trainer's arguments (its own parser: the same contract) plus --capture-ids."""
    from modelopt_ext.train import build_parser

    p = build_parser()
    p.prog = "python -m modelopt_ext.job_info"
    p.description = __doc__.splitlines()[0]
    p.add_argument(
        "--capture-ids",
        default=None,
        help="Layer ids the hidden-state servers capture ('2,30,58,61' or '[2,30,58,61]': the drafter's ids, "
        "then the target's layer count L); validated against the target, and the trainers read the same.",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the assignments; bad input is one line per problem and exit 2."""
    from modelopt_ext.targets.locate import TargetPathError
    from modelopt_ext.util.errors import ConfigError, exit_with

    args = parse_args(argv)
    try:
        info = job_info(args.config, list(args.overrides), args.capture_ids)
    except ConfigError as e:
        exit_with(e)
    except CaptureIdsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
