"""The draft vocabulary: the target-vocabulary ids the drafter's lm_head predicts over.

Forms (the ones vLLM and SGLang load):
- `d2t` int64 [Vd]: draft id i -> target id `i + d2t[i]`;
- `t2d` bool [V]: True where a target id is in the draft vocabulary.
Draft ids are ordered by supervised-token frequency (most frequent first), with the special tokens always in.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_FILE = "vocab_mapping.safetensors"


@dataclass
class DraftVocab:
    """d2t (int64 [Vd], target = draft + d2t) and t2d (bool [V])."""

    d2t: torch.Tensor
    t2d: torch.Tensor

    def __post_init__(self) -> None:
        self.d2t = torch.as_tensor(self.d2t, dtype=torch.int64)
        self.t2d = torch.as_tensor(self.t2d, dtype=torch.bool)
        sel = self.selected_ids
        if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= self.t2d.numel()):
            raise ValueError(f"d2t maps outside the target vocabulary of {self.t2d.numel()}")
        if int(self.t2d.sum()) != sel.numel() or not bool(self.t2d[sel].all()):
            raise ValueError("d2t and t2d disagree: t2d must be True exactly at the selected target ids")
        if torch.unique(sel).numel() != sel.numel():
            raise ValueError("d2t selects a target id twice")

    @property
    def selected_ids(self) -> torch.Tensor:
        """Target id of each draft id: int64 [Vd] = arange(Vd) + d2t."""
        return torch.arange(self.d2t.numel(), dtype=torch.int64) + self.d2t

    @property
    def draft_vocab_size(self) -> int:
        """Vd."""
        return self.d2t.numel()

    @property
    def target_vocab_size(self) -> int:
        """V."""
        return self.t2d.numel()

    @property
    def is_identity(self) -> bool:
        """True when the draft vocabulary is the whole target vocabulary, in order."""
        return self.draft_vocab_size == self.target_vocab_size and not bool(self.d2t.any())

    def save(self, dir: str | Path) -> Path:
        """Write `<dir>/vocab_mapping.safetensors` (atomic); returns its path."""
        from safetensors.torch import save_file

        path = Path(dir) / VOCAB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            save_file({"d2t": self.d2t.contiguous(), "t2d": self.t2d.contiguous()}, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, dir: str | Path) -> DraftVocab:
        """Read `<dir>/vocab_mapping.safetensors` (a folder, or the file itself)."""
        from safetensors.torch import load_file

        path = Path(dir)
        if path.is_dir():
            path = path / VOCAB_FILE
        tensors = load_file(str(path))
        missing = [k for k in ("d2t", "t2d") if k not in tensors]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}")
        return cls(d2t=tensors["d2t"], t2d=tensors["t2d"])

    @classmethod
    def from_selected_ids(
        cls, selected_ids: torch.Tensor | Iterable[int], target_vocab_size: int
    ) -> DraftVocab:
        """The vocabulary whose draft id i is target id selected_ids[i]."""
        sel = torch.as_tensor(
            list(selected_ids) if not isinstance(selected_ids, torch.Tensor) else selected_ids,
            dtype=torch.int64,
        )
        t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
        t2d[sel] = True
        return cls(d2t=sel - torch.arange(sel.numel(), dtype=torch.int64), t2d=t2d)


def build_draft_vocab(
    token_counts: Counter | torch.Tensor,
    target_vocab_size: int,
    draft_vocab_size: int,
    special_ids: Iterable[int] = (),
) -> DraftVocab:
    """The draft vocabulary from supervised-token counts: special tokens first, then most frequent first.

    Ties are broken by the lower target id (deterministic). Identity when draft_vocab_size >= target_vocab_size.
    Counts may be shorter than the target vocabulary (a padded embedding): missing ids count 0.
    """
    if draft_vocab_size <= 0 or target_vocab_size <= 0:
        raise ValueError(
            f"vocabulary sizes must be > 0 (draft {draft_vocab_size}, target {target_vocab_size})"
        )
    if draft_vocab_size >= target_vocab_size:
        return DraftVocab(
            d2t=torch.zeros(target_vocab_size, dtype=torch.int64),
            t2d=torch.ones(target_vocab_size, dtype=torch.bool),
        )
    counts = torch.zeros(target_vocab_size, dtype=torch.float64)
    if isinstance(token_counts, torch.Tensor):
        c = token_counts.flatten().to(torch.float64)[:target_vocab_size]
        counts[: c.numel()] = c
    else:
        for tok, n in token_counts.items():
            if 0 <= int(tok) < target_vocab_size:
                counts[int(tok)] += n
    special = sorted({int(i) for i in special_ids if 0 <= int(i) < target_vocab_size})
    if len(special) > draft_vocab_size:
        raise ValueError(
            f"{len(special)} special tokens do not fit in a draft vocabulary of {draft_vocab_size}"
        )
    # Stable sort on -count keeps ties in target-id order.
    order = torch.sort(-counts, stable=True).indices
    is_special = torch.zeros(target_vocab_size, dtype=torch.bool)
    is_special[special] = True
    rest = order[~is_special[order]][: draft_vocab_size - len(special)]
    ranked = torch.cat([torch.tensor(special, dtype=torch.int64), rest])
    # Keep frequency order among all selected ids (specials ranked by their own count too).
    sel = ranked[torch.sort(-counts[ranked], stable=True).indices]
    return DraftVocab.from_selected_ids(sel, target_vocab_size)


def count_supervised_tokens(dataset, vocab_size: int | None = None) -> torch.Tensor:
    """Counts (int64 [V]) of the tokens under the loss mask across the dataset's items.

    V is `vocab_size`, else the dataset's `vocab_size` attribute, else the largest id seen + 1.
    """
    if hasattr(dataset, "supervised_token_counts"):  # ConversationDataset: one pass over its flat arrays
        return dataset.supervised_token_counts(vocab_size)
    counts: torch.Tensor | None = None
    size = vocab_size or getattr(dataset, "vocab_size", None)
    if size:
        counts = torch.zeros(int(size), dtype=torch.int64)
    for i in range(len(dataset)):
        item = dataset[i]
        toks = item["input_ids"][item["loss_mask"].bool()]
        if toks.numel() == 0:
            continue
        top = int(toks.max()) + 1
        if counts is None or top > counts.numel():
            grown = torch.zeros(max(top, 0 if counts is None else counts.numel()), dtype=torch.int64)
            if counts is not None:
                grown[: counts.numel()] = counts
            counts = grown
        counts += torch.bincount(toks, minlength=counts.numel())
    return counts if counts is not None else torch.zeros(0, dtype=torch.int64)
