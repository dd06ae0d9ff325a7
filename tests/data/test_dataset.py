"""ConversationDataset (tokenisation cache, truncation, drops) and collate_padded."""

from __future__ import annotations

import json

import pytest
import torch

from modelopt_ext.config.recipe import DataConfig
from modelopt_ext.data import dataset as dataset_mod
from modelopt_ext.data.dataset import ConversationDataset, collate_padded
from modelopt_ext.targets.tiny import write_tiny_conversations


@pytest.fixture()
def data_file(tmp_path):
    return write_tiny_conversations(tmp_path / "conv.jsonl", 12, seed=3)


def test_items_and_cache_hit_without_retokenising(tmp_path, data_file, tiny_tokenizer, monkeypatch):
    cfg = DataConfig(path=str(data_file), max_length=512)
    logs = []
    first = ConversationDataset(cfg, tiny_tokenizer, tmp_path / "cache", log=logs.append)
    assert len(first) == 12
    item = first[0]
    assert item["input_ids"].dtype == torch.int64 and item["loss_mask"].dtype == torch.bool
    assert item["input_ids"].shape == item["loss_mask"].shape
    assert 0 < int(item["loss_mask"].sum()) < len(item["loss_mask"])
    assert any("tokenised 12 conversations" in m for m in logs)
    assert first.cache_file.is_file() and first.cache_file.parent == tmp_path / "cache"
    assert not [p for p in first.cache_file.parent.iterdir() if p.name.startswith(".")]  # no temp left

    # A restart must not tokenise again: make tokenising impossible and rebuild.
    def boom(*a, **k):
        raise AssertionError("tokenised again despite a cache")

    monkeypatch.setattr(dataset_mod, "read_conversations", boom)
    logs.clear()
    second = ConversationDataset(cfg, tiny_tokenizer, tmp_path / "cache", log=logs.append)
    assert any("from the cache" in m for m in logs)
    assert len(second) == len(first)
    for i in range(len(first)):
        assert torch.equal(second[i]["input_ids"], first[i]["input_ids"])
        assert torch.equal(second[i]["loss_mask"], first[i]["loss_mask"])


def test_cache_key_follows_content_and_max_length(tmp_path, data_file, tiny_tokenizer):
    a = ConversationDataset(
        DataConfig(path=str(data_file), max_length=512), tiny_tokenizer, tmp_path, log=lambda m: None
    )
    b = ConversationDataset(
        DataConfig(path=str(data_file), max_length=64), tiny_tokenizer, tmp_path, log=lambda m: None
    )
    assert a.cache_file != b.cache_file
    assert max(b.length(i) for i in range(len(b))) <= 64
    with data_file.open("a") as f:
        f.write(
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
            )
            + "\n"
        )
    logs = []
    c = ConversationDataset(
        DataConfig(path=str(data_file), max_length=512), tiny_tokenizer, tmp_path, log=logs.append
    )
    assert len(c) == 13 and any("tokenised 13" in m for m in logs)


def test_torn_cache_is_rebuilt(tmp_path, data_file, tiny_tokenizer):
    cfg = DataConfig(path=str(data_file), max_length=512)
    a = ConversationDataset(cfg, tiny_tokenizer, tmp_path, log=lambda m: None)
    a.cache_file.write_bytes(b"garbage")
    logs = []
    b = ConversationDataset(cfg, tiny_tokenizer, tmp_path, log=logs.append)
    assert len(b) == len(a) and any("unreadable" in m for m in logs)


def test_samples_without_assistant_tokens_after_truncation_are_dropped(tmp_path, tiny_tokenizer, capsys):
    long_user = " ".join(["red"] * 200)
    rows = [
        {"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "ok ."}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok ."}]},
    ]
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ConversationDataset(
        DataConfig(path=str(p), max_length=32), tiny_tokenizer, tmp_path, log=lambda m: None
    )
    assert len(ds) == 1 and ds.num_dropped == 1
    assert "dropped 1 conversations" in capsys.readouterr().err


def test_collate_right_pads():
    items = [
        {"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([False, True, True])},
        {"input_ids": torch.tensor([8]), "loss_mask": torch.tensor([True])},
    ]
    out = collate_padded(items, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert out["loss_mask"].tolist() == [[False, True, True], [True, False, False]]
    assert out["input_ids"].dtype == torch.int64 and out["loss_mask"].dtype == torch.bool


def test_parallel_tokenisation_equals_serial(tmp_path, tiny_tokenizer):
    from modelopt_ext.data.conversations import read_conversations
    from modelopt_ext.data.dataset import tokenize_all

    convs = read_conversations(write_tiny_conversations(tmp_path / "c.jsonl", 40, seed=9))
    assert tokenize_all(convs, tiny_tokenizer, None, num_proc=2) == tokenize_all(convs, tiny_tokenizer, None)


RAISING = (
    "{%- for m in messages %}{%- if m['content'] == 'boom' %}{{ raise_exception('no boom here') }}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_conversation_the_template_rejects_is_skipped_or_strict_error(tmp_path, tiny_tokenizer, capsys):
    from modelopt_ext.util.errors import ConfigError

    rows = [
        {"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "ok ."}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok ."}]},
    ]
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ConversationDataset(
        DataConfig(path=str(p), chat_template=RAISING), tiny_tokenizer, tmp_path, log=lambda m: None
    )
    assert len(ds) == 1
    err = capsys.readouterr().err
    assert (
        "skipped 1 conversations" in err
        and "conversation 1: the chat template failed" in err
        and "no boom" in err
    )
    with pytest.raises(ConfigError, match="conversation 1"):
        ConversationDataset(
            DataConfig(path=str(p), chat_template=RAISING, strict=True),
            tiny_tokenizer,
            tmp_path / "s",
            log=lambda m: None,
        )


def test_supervised_counts_fast_path_equals_item_by_item(tmp_path, data_file, tiny_tokenizer):
    from modelopt_ext.data.draft_vocab import count_supervised_tokens

    ds = ConversationDataset(DataConfig(path=str(data_file)), tiny_tokenizer, tmp_path, log=lambda m: None)
    items = [ds[i] for i in range(len(ds))]
    fast, slow = count_supervised_tokens(ds), count_supervised_tokens(items, vocab_size=len(tiny_tokenizer))
    assert torch.equal(fast, slow) and fast.numel() == len(tiny_tokenizer) and int(fast.sum()) > 0
    eos = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert int(fast[eos]) >= len(ds)  # every assistant turn ends with a supervised <|im_end|>
