"""Which supervision source feeds the trainer, keyed by `recipe.data.mode`.

Every source ends in the same `Supervision` batch (targets/supervision.py), but sources differ in where the
work happens: the colocated one runs the target on each collated batch; a streaming one fetches per item
inside the dataset (so it wraps the dataset and brings its own collate). A builder therefore returns a
`SourceSetup` (dataset, collate, source callable, TargetHead, aux layer ids, target embeddings), and the
trainer never knows which one it got. Later sources register themselves with `register_source`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from modelopt_ext.config.recipe import Recipe
from modelopt_ext.supply.setup import SourceSetup
from modelopt_ext.util.errors import ConfigError

if TYPE_CHECKING:  # the rank a builder runs on; training/ builds it (a runtime import would be a cycle)
    from modelopt_ext.training.distributed import DistEnv

# (recipe, env, conversations dataset, pad_id, draft vocab) -> SourceSetup
SourceBuilder = Callable[[Recipe, "DistEnv", Any, int, Any], SourceSetup]
_BUILDERS: dict[str, SourceBuilder] = {}


def register_source(mode: str, builder: SourceBuilder) -> None:
    """Make `data.mode: <mode>` available to the trainer."""
    _BUILDERS[mode] = builder


def check_source(recipe: Recipe) -> SourceBuilder:
    """The builder for the recipe's data mode; a mode with no builder is a one-line config error.

    Called before anything heavy is loaded, so an unsupported mode fails in a second.
    """
    mode = recipe.data.mode or "colocated"
    builder = _BUILDERS.get(mode)
    if builder is None:
        raise ConfigError(
            [f"data.mode: the {mode!r} source is not built yet (available: {', '.join(sorted(_BUILDERS))})"]
        )
    return builder


def make_source(recipe: Recipe, env: DistEnv, dataset: Any, pad_id: int, vocab: Any) -> SourceSetup:
    """The SourceSetup for the recipe's data mode."""
    return check_source(recipe)(recipe, env, dataset, pad_id, vocab)


def _colocated(recipe: Recipe, env: DistEnv, dataset: Any, pad_id: int, vocab: Any) -> SourceSetup:
    """The target in this process, on this rank's device; the head shares its tensors (no second read)."""
    from modelopt_ext.data.dataset import collate_padded
    from modelopt_ext.supply.colocated import ColocatedSource
    from modelopt_ext.targets.head import TargetHead

    src = ColocatedSource.from_recipe(recipe, device=env.device)
    head = TargetHead.from_model(src.model)
    return SourceSetup(
        dataset=dataset,
        collate=partial(collate_padded, pad_id=pad_id),
        source=src,
        head=head,
        aux_layer_ids=list(src.aux_layer_ids),
        target_embeddings=head.embed_tokens,
    )


register_source("colocated", _colocated)


def _streaming(recipe: Recipe, env: DistEnv, dataset: Any, pad_id: int, vocab: Any) -> SourceSetup:
    """vLLM hidden-state servers (supply/vllm/source.py); imported only when used."""
    from modelopt_ext.supply.vllm.source import build_streaming_source

    return build_streaming_source(recipe, env, dataset, pad_id, vocab)


register_source("streaming", _streaming)


def _remote(recipe: Recipe, env: DistEnv, dataset: Any, pad_id: int, vocab: Any) -> SourceSetup:
    """serve_target, the transformers target server (supply/target_server/source.py); imported only when used."""
    from modelopt_ext.supply.target_server.source import build_remote_source

    return build_remote_source(recipe, env, dataset, pad_id, vocab)


register_source("remote", _remote)


def _offline(recipe: Recipe, env: DistEnv, dataset: Any, pad_id: int, vocab: Any) -> SourceSetup:
    """A supervision dump (supply/offline.py), and for hybrid servers filling it; imported only when used."""
    from modelopt_ext.supply import offline
    build = offline.build_hybrid_source if recipe.data.mode == "hybrid" else offline.build_offline_source
    return build(recipe, env, dataset, pad_id, vocab)


register_source("offline", _offline)
register_source("hybrid", _offline)
