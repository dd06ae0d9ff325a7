"""Draft vocabulary: d2t/t2d semantics (target = draft + d2t), frequency order, specials, identity, round trip."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from modelopt_ext.data.draft_vocab import DraftVocab, build_draft_vocab, count_supervised_tokens


def test_d2t_and_t2d_are_consistent_and_frequency_ordered():
    counts = torch.zeros(20, dtype=torch.long)
    counts[[7, 3, 15, 9, 1]] = torch.tensor([50, 40, 30, 20, 10])
    v = build_draft_vocab(counts, target_vocab_size=20, draft_vocab_size=4)
    assert v.d2t.dtype == torch.int64 and v.t2d.dtype == torch.bool
    assert v.selected_ids.tolist() == [7, 3, 15, 9]
    assert (torch.arange(4) + v.d2t).tolist() == [7, 3, 15, 9]  # target = draft + d2t
    assert v.d2t.tolist() == [7, 2, 13, 6]
    assert v.t2d.nonzero().flatten().tolist() == [3, 7, 9, 15]
    assert v.t2d.numel() == 20 and not v.is_identity


def test_special_tokens_are_kept_even_when_rare():
    counts = Counter({5: 100, 6: 90, 7: 80, 8: 70})
    v = build_draft_vocab(counts, target_vocab_size=12, draft_vocab_size=3, special_ids=[11])
    assert sorted(v.selected_ids.tolist()) == [5, 6, 11]
    assert v.selected_ids.tolist()[:2] == [5, 6]  # frequency order kept for the rest


def test_ties_broken_by_target_id_deterministically():
    v = build_draft_vocab(torch.ones(10), target_vocab_size=10, draft_vocab_size=3)
    assert v.selected_ids.tolist() == [0, 1, 2]


def test_identity_when_draft_vocab_covers_the_target():
    v = build_draft_vocab(Counter({3: 1}), target_vocab_size=8, draft_vocab_size=8)
    assert v.is_identity and v.d2t.tolist() == [0] * 8 and bool(v.t2d.all())
    assert build_draft_vocab(Counter(), 8, 100).draft_vocab_size == 8


def test_counts_shorter_than_a_padded_target_vocab():
    v = build_draft_vocab(torch.tensor([0, 5, 1]), target_vocab_size=16, draft_vocab_size=2)
    assert v.selected_ids.tolist() == [1, 2] and v.t2d.numel() == 16


def test_save_load_round_trip(tmp_path):
    v = build_draft_vocab(torch.arange(30).flip(0), 30, 5, special_ids=[29])
    path = v.save(tmp_path)
    assert path.name == "vocab_mapping.safetensors"
    w = DraftVocab.load(tmp_path)
    assert torch.equal(w.d2t, v.d2t) and torch.equal(w.t2d, v.t2d)
    assert torch.equal(DraftVocab.load(path).d2t, v.d2t)


def test_inconsistent_mapping_is_rejected():
    with pytest.raises(ValueError, match="disagree"):
        DraftVocab(d2t=torch.tensor([1, 1]), t2d=torch.tensor([True, False, False, False]))
    with pytest.raises(ValueError, match="outside"):
        DraftVocab(d2t=torch.tensor([9]), t2d=torch.zeros(4, dtype=torch.bool))


def test_count_supervised_tokens_counts_only_masked_tokens():
    items = [
        {"input_ids": torch.tensor([1, 2, 2, 3]), "loss_mask": torch.tensor([False, True, True, False])},
        {"input_ids": torch.tensor([3, 4]), "loss_mask": torch.tensor([True, True])},
    ]
    counts = count_supervised_tokens(items, vocab_size=6)
    assert counts.tolist() == [0, 0, 2, 1, 1, 0]
    assert count_supervised_tokens(items).tolist() == [0, 0, 2, 1, 1]
