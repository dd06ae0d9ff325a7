"""The tiny target's language and build (the build itself is an e2e test: it fits a model)."""

from __future__ import annotations

import json

import pytest

from modelopt_ext.data.conversations import read_conversations
from modelopt_ext.targets.tiny import write_tiny_conversations


def test_tiny_conversations_are_deterministic_and_in_both_forms(tmp_path):
    a = write_tiny_conversations(tmp_path / "a.jsonl", 20, seed=1)
    b = write_tiny_conversations(tmp_path / "b.jsonl", 20, seed=1)
    assert a.read_text() == b.read_text()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert {"messages", "conversations"} <= {k for r in rows for k in r}
    convs = read_conversations(a, strict=True)
    assert len(convs) == 20 and all(any(m["role"] == "assistant" for m in c) for c in convs)


@pytest.mark.e2e
def test_build_tiny_target_loads_offline_and_answers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelopt_ext.targets.tiny import build_tiny_target

    out = build_tiny_target(tmp_path / "tiny")
    logs = []
    assert build_tiny_target(out, log=logs.append) == out
    assert "reusing" in logs[0]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.head_dim == 64 and model.dtype == torch.float32
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "what day comes after friday ?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    text = tok.decode(gen[0, prompt["input_ids"].shape[1] :])
    assert text.startswith("the day after friday is saturday")
