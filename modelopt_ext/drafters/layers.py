"""Which target layers a drafter reads: the recipe's explicit `model.aux_layer_ids`, or the drafter's rule.

The drafter owns its default rule (`Drafter.default_layer_ids`); this module applies it for a recipe and a
target and validates the result against the target (targets/layers.py). Every source, server, CLI and
`job_info` asks here. No torch import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modelopt_ext.drafters import resolve_drafter
from modelopt_ext.targets.layers import capture_layer_ids, check_layer_ids, target_num_layers
from modelopt_ext.targets.locate import target_config


def drafter_layer_ids(
    num_layers: int, explicit: Sequence[int] | None = None, drafter: Any = None, settings: Any = None
) -> list[int]:
    """The layers the drafter reads: `explicit` (the recipe's `model.aux_layer_ids`) or the drafter's
    default rule for this target (default drafter and settings when None), validated."""
    if explicit is not None:
        return check_layer_ids(num_layers, explicit)
    if drafter is None:
        drafter = resolve_drafter(None)
    settings = settings if settings is not None else drafter.Settings()
    return check_layer_ids(num_layers, drafter.default_layer_ids(num_layers, settings))


def recipe_layer_ids(recipe: Any, num_layers: int | None = None) -> list[int]:
    """The layers a recipe's drafter reads from its target (`num_layers` read from model.path when None)."""
    if num_layers is None:
        num_layers = target_num_layers(target_config(recipe.model.path, "model.path"))
    return drafter_layer_ids(
        num_layers, recipe.model.aux_layer_ids, resolve_drafter(recipe.drafter), recipe.drafter_settings
    )


def recipe_target_problems(recipe: Any) -> list[str]:
    """What is wrong with a recipe for its target (one line each, naming the field): its layer ids (the
    explicit `model.aux_layer_ids` or the drafter's rule) and the drafter's own checks (`Drafter.check_target`).
    Reads only the target's config.json."""
    cfg = target_config(recipe.model.path, "model.path")
    try:
        num_layers = target_num_layers(cfg)
    except ValueError:
        return []  # not a usable model config: the loader says so, in context
    problems = []
    try:
        recipe_layer_ids(recipe, num_layers)
    except ValueError as e:
        problems.append(f"model.aux_layer_ids: {e}")
    return problems + resolve_drafter(recipe.drafter).check_target(recipe.drafter_settings, cfg)


def default_capture_ids(num_layers: int, aux_layer_ids: Sequence[int] | None = None) -> list[int]:
    """What a server captures for the default drafter: `aux_layer_ids` (or its rule), then L."""
    return capture_layer_ids(num_layers, drafter_layer_ids(num_layers, aux_layer_ids))
