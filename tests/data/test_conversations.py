"""Conversations: both JSONL forms, bad lines, and the assistant loss mask for three chat templates."""

from __future__ import annotations

import json

import pytest

from modelopt_ext.data.conversations import read_conversations, resolve_chat_template, tokenize_conversation
from modelopt_ext.util.errors import ConfigError

# Llama-3-like: BOS in the text, headers as special tokens, <|eot_id|> ends a turn.
LLAMA3 = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Qwen3-like without thinking: a default system prompt is injected, the generation prompt carries an empty
# think block, the LAST assistant turn is rendered with it and earlier ones without (history is rewritten
# once a later turn exists).
THINKING = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nyou are a helpful assistant .<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)

MESSAGES = [
    {"role": "user", "content": "what day comes after monday ?"},
    {"role": "assistant", "content": "the day after monday is tuesday ."},
    {"role": "user", "content": "tell me about the cat ."},
    {"role": "assistant", "content": "the cat is small . the cat eats fish ."},
]


def masked_runs(tokenizer, ids, mask) -> list[str]:
    """The decoded text of each contiguous run of masked tokens."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def test_chatml_mask_covers_exactly_the_assistant_turns(tiny_tokenizer):
    ids, mask = tokenize_conversation(tiny_tokenizer, MESSAGES, max_length=4096)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert masked_runs(tiny_tokenizer, ids, mask) == [
        "the day after monday is tuesday .<|im_end|>\n",
        "the cat is small . the cat eats fish .<|im_end|>\n",
    ]
    # The ids are the tokenised full render (what a server would see), special tokens as single ids.
    full = tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert ids == tiny_tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids.count(tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 4


def test_llama3_template_mask(llama3_tokenizer):
    ids, mask = tokenize_conversation(llama3_tokenizer, MESSAGES, 4096, chat_template=LLAMA3)
    assert ids[0] == llama3_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert masked_runs(llama3_tokenizer, ids, mask) == [
        "the day after monday is tuesday .<|eot_id|>",
        "the cat is small . the cat eats fish .<|eot_id|>",
    ]


def test_thinking_template_with_injected_system_prompt_and_rewritten_history(tiny_tokenizer):
    ids, mask = tokenize_conversation(tiny_tokenizer, MESSAGES, 4096, chat_template=THINKING)
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nyou are a helpful assistant .")  # injected, never masked
    assert "<think>" in text
    # The empty think block comes with the generation prompt, so it is prompt, not something to learn;
    # the first turn's render changed once the second existed and is still found.
    assert masked_runs(tiny_tokenizer, ids, mask) == [
        "the day after monday is tuesday .<|im_end|>\n",
        "the cat is small . the cat eats fish .<|im_end|>\n",
    ]


def test_template_from_file_and_bad_value(tmp_path, llama3_tokenizer):
    f = tmp_path / "t.jinja"
    f.write_text(LLAMA3)
    assert resolve_chat_template(str(f)) == LLAMA3
    assert resolve_chat_template(LLAMA3) == LLAMA3
    with pytest.raises(ConfigError, match="data.chat_template"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))


def test_truncation_keeps_ids_and_mask_aligned(tiny_tokenizer):
    ids, mask = tokenize_conversation(tiny_tokenizer, MESSAGES, 4096)
    short_ids, short_mask = tokenize_conversation(tiny_tokenizer, MESSAGES, 20)
    assert short_ids == ids[:20] and short_mask == mask[:20]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_both_forms_read_to_the_same_messages(tmp_path):
    openai = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}],
            },
        ]
    }
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
        ]
    }
    p = write_lines(tmp_path / "c.jsonl", [json.dumps(openai), json.dumps(sharegpt)])
    convs = read_conversations(p)
    assert (
        convs[0]
        == convs[1]
        == [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    )


BAD = [
    json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
    "",
    "{not json",
    json.dumps({"text": "no conversation key"}),
    json.dumps({"conversations": [{"from": "robot", "value": "x"}]}),
    json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
    json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
]


def test_bad_lines_are_skipped_with_line_numbers(tmp_path):
    p = write_lines(tmp_path / "bad.jsonl", BAD)
    warnings = []
    convs = read_conversations(p, warn=warnings.append)
    assert len(convs) == 2
    assert len(warnings) == 1
    w = warnings[0]
    assert "skipped 5 of 7 lines" in w and str(p) in w
    for n in (2, 3, 4, 5):
        assert f"line {n}:" in w
    assert "and 0 more" not in w and "line 1:" not in w and "line 7:" not in w


def test_bad_lines_in_strict_mode_are_one_error_line_each(tmp_path):
    p = write_lines(tmp_path / "bad.jsonl", BAD)
    with pytest.raises(ConfigError) as e:
        read_conversations(p, strict=True)
    lines = e.value.lines()
    assert len(lines) == 5
    assert lines[0] == f"{p}: line 2: empty line"
    assert lines[1].startswith(f"{p}: line 3: not valid JSON")
    assert "unknown role 'robot'" in lines[3]
    assert "no non-empty assistant turn" in lines[4]


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read conversations"):
        read_conversations(tmp_path / "nope.jsonl")
