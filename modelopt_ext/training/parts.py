"""Build the real training parts from a recipe: tokenised data, draft vocabulary, source, drafter.

Order matters and is the same on every rank:
1. tokenizer + `ConversationDataset` (every rank; the tokenisation cache is shared and written atomically);
2. the draft vocabulary: restored from the checkpoint when resuming; otherwise counted from the supervised
   tokens on rank 0 and broadcast, so every rank builds the identical mapping;
3. the supervision source for `data.mode` (sources.make_source), which also yields the TargetHead and the
   target's input embeddings;
4. the drafter the recipe names (`drafter:`; modelopt_ext/drafters/), built by the drafter itself from the
   target's config, the layers the source captures, the vocabulary and the target's embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelopt_ext.config.recipe import Recipe
from modelopt_ext.drafters.base import LossFn
from modelopt_ext.supply.sources import make_source
from modelopt_ext.training.distributed import DistEnv, broadcast_tensor


@dataclass
class TrainingParts:
    """Everything the loop needs besides the recipe.

    dataset: map-style, item -> {"input_ids": LongTensor[T], "loss_mask": BoolTensor[T]}
    collate: list of items -> collated batch dict (input_ids, attention_mask, loss_mask)
    source: collated batch (on the training device) -> Supervision
    model: the draft nn.Module (its state_dict is what checkpoints hold, d2t/t2d included)
    model_config: JSON-ready dict written as the checkpoint's config.json
    vocab: the draft vocabulary (`.save(dir)` writes vocab_mapping.safetensors)
    head: what the loss needs to turn supervision into target probabilities (TargetHead)
    loss_fn: (model, sup, vocab, head) -> (loss, metrics), the drafter's objective (drafters/base.py)
    export_fn: (checkpoint_dir, out_dir) -> Path, or None when no exporter is available
    """

    dataset: Any
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    source: Callable[[dict[str, torch.Tensor]], Any]
    model: torch.nn.Module
    model_config: dict[str, Any]
    vocab: Any
    head: Any
    loss_fn: LossFn
    export_fn: Callable[[Path, Path], Path] | None = None
    notes: list[str] = field(default_factory=list)  # lines to print once at start (rank 0)


# (recipe, this rank, checkpoint to resume from) -> the parts; build_parts, or a test's stand-in
PartsFactory = Callable[[Recipe, DistEnv, "Path | None"], TrainingParts]


def _text_config(hf_config: Any) -> Any:
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def load_dataset(recipe: Recipe, env: DistEnv, tokenizer: Any) -> Any:
    """The tokenised conversations, on every rank at once.

    No rank waits for another here: tokenising a large dataset can outlast the process group's collective
    timeout, and the cache is written atomically, so ranks racing to fill it are harmless.
    """
    from modelopt_ext.data.dataset import ConversationDataset

    cache_dir = Path(recipe.data.cache_dir or Path(recipe.training.output_dir) / "cache")
    log = None if env.is_main else (lambda msg: None)
    dataset = ConversationDataset(recipe.data, tokenizer, cache_dir, log=log)
    if len(dataset) == 0:
        raise ValueError(f"{recipe.data.path}: no usable conversations")
    return dataset


def build_vocab(
    recipe: Recipe, env: DistEnv, dataset: Any, tokenizer: Any, vocab_size: int, resume_from: Path | None
):
    """The draft vocabulary: from the checkpoint when resuming, else from supervised-token counts."""
    from modelopt_ext.data.draft_vocab import DraftVocab, build_draft_vocab, count_supervised_tokens

    if resume_from is not None:
        return DraftVocab.load(resume_from)
    counts = torch.zeros(vocab_size, dtype=torch.long)
    if env.is_main:
        c = torch.as_tensor(count_supervised_tokens(dataset, vocab_size), dtype=torch.long)
        counts[: min(len(c), vocab_size)] = c[:vocab_size]
    counts = broadcast_tensor(counts, env)
    special = [i for i in tokenizer.all_special_ids if i is not None and 0 <= i < vocab_size]
    from modelopt_ext.drafters import resolve_drafter

    size = resolve_drafter(recipe.drafter).draft_vocab_size(recipe.drafter_settings, vocab_size)
    return build_draft_vocab(counts, vocab_size, size, special_ids=special)


def build_parts(recipe: Recipe, env: DistEnv, resume_from: Path | None) -> TrainingParts:
    """TrainingParts for the recipe on this rank (see the module docstring for the order)."""
    from transformers import AutoConfig, AutoTokenizer

    from modelopt_ext.drafters import resolve_drafter

    trust = recipe.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path, trust_remote_code=trust)
    hf_config = AutoConfig.from_pretrained(recipe.model.path, trust_remote_code=trust)
    vocab_size = int(_text_config(hf_config).vocab_size)
    dataset = load_dataset(recipe, env, tokenizer)
    vocab = build_vocab(recipe, env, dataset, tokenizer, vocab_size, resume_from)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    setup = make_source(recipe, env, dataset, pad_id, vocab)

    drafter = resolve_drafter(recipe.drafter)
    built = drafter.build(
        recipe.drafter_settings,
        hf_config,
        list(setup.aux_layer_ids),
        vocab,
        setup.target_embeddings,
        target_head=setup.head,
        tokenizer=tokenizer,
    )
    notes = [
        f"data: {len(dataset)} conversations from {recipe.data.path} (mode {recipe.data.mode})",
        f"draft: vocab {len(vocab.d2t)}/{vocab_size}"
        + (" (restored from the checkpoint)" if resume_from else " (from supervised-token counts)")
        + f", target layers {setup.aux_layer_ids} (vLLM numbering)",
        *built.notes,
    ]
    from modelopt_ext.deploy.export import export_checkpoint

    export_fn = export_checkpoint if recipe.training.export_at_end else None
    return TrainingParts(
        dataset=setup.dataset,
        collate=setup.collate,
        source=setup.source,
        model=built.model,
        model_config=built.config,
        vocab=vocab,
        head=setup.head,
        loss_fn=built.loss_fn,
        export_fn=export_fn,
        notes=notes,
    )
