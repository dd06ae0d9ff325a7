"""Conversations JSONL -> messages -> token ids with a loss mask on the assistant's tokens.

Two input forms are read (one JSON object per line):
- OpenAI: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`;
- ShareGPT: `{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}]}`.

The loss mask is derived from render boundaries, not from hard-coded role markers: each assistant turn's
span is where the render of the conversation up to that turn (with the generation prompt) stops agreeing
with the render that includes the turn. That stays right for templates that inject a default system
prompt, add `<think></think>` text to the generation prompt, or rewrite earlier turns.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from modelopt_ext.util.errors import ConfigError

_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}
_MAX_LISTED = 5  # bad lines named individually in the skip warning; the rest are counted


def _content_text(content: Any) -> str | None:
    """Message content as text: a string, or OpenAI content parts of type text (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = [p.get("text") for p in content if p.get("type", "text") == "text"]
        if all(isinstance(t, str) for t in parts) and parts:
            return "".join(parts)
    return None


def parse_conversation(row: Any) -> list[dict]:
    """One JSONL object -> [{"role", "content"}]; raises ValueError saying what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")  # noqa: TRY004 (bad data, not a bug)
    if "messages" in row:
        raw, role_key, text_key, form = row["messages"], "role", "content", "messages"
    elif "conversations" in row:
        raw, role_key, text_key, form = row["conversations"], "from", "value", "conversations"
    else:
        raise ValueError("no 'messages' (OpenAI form) or 'conversations' (ShareGPT form) key")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"'{form}' must be a non-empty list")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"{form}[{i}] is not an object")  # noqa: TRY004 (bad data, not a bug)
        role = _ROLE_ALIASES.get(str(m.get(role_key, "")).lower())
        if role is None:
            allowed = ", ".join(sorted(_ROLE_ALIASES))
            raise ValueError(f"{form}[{i}].{role_key}: unknown role {m.get(role_key)!r} (allowed: {allowed})")
        text = _content_text(m.get(text_key))
        if text is None:
            raise ValueError(f"{form}[{i}].{text_key}: missing or not text")
        messages.append({"role": role, "content": text})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError("no non-empty assistant turn (nothing to learn)")
    return messages


def read_conversations(path: str | Path, strict: bool = False, warn=None) -> list[list[dict]]:
    """Read a conversations JSONL file into role/content message lists.

    Malformed or empty lines are reported with their line numbers: skipped with a count and one warning line,
    or, with `strict`, a ConfigError listing every bad line. `warn` receives the warning line (default: stderr).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"cannot read conversations: {e.strerror or e}"], source=str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text ({e.reason} at byte {e.start})"], source=str(path)) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start an empty line
    out: list[list[dict]] = []
    problems: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            problems.append(f"line {lineno}: empty line")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        try:
            out.append(parse_conversation(row))
        except ValueError as e:
            problems.append(f"line {lineno}: {e}")
    if problems:
        if strict:
            raise ConfigError(problems, source=str(path))
        shown = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        msg = f"warning: data: skipped {len(problems)} of {len(lines)} lines in {path}: {shown}{more}"
        (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)
    return out


def resolve_chat_template(chat_template: str | None) -> str | None:
    """`data.chat_template` -> template text: inline Jinja as is, else the content of a .jinja file."""
    if chat_template is None:
        return None
    if "{%" in chat_template or "{{" in chat_template:
        return chat_template
    p = Path(chat_template).expanduser()
    if p.is_file():
        return p.read_text(encoding="utf-8")
    raise ConfigError(
        [f"data.chat_template: {chat_template!r} is neither a file nor an inline Jinja template"]
    )


def _render(
    tokenizer: Any, messages: list[dict], add_generation_prompt: bool, chat_template: str | None
) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
    )


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_spans(
    tokenizer: Any, messages: list[dict], chat_template: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The full render and the character spans [start, end) of each assistant turn in it.

    A turn starts where the render with the generation prompt and the render including the turn diverge
    (so generation-prompt extras such as an empty `<think></think>` stay out of the mask when the turn itself
    does not contain them) and ends where the render including the turn ends (its end-of-turn marker is learned).
    When the template rewrites earlier turns once later ones exist, the turn is located by its content instead.
    """
    full = _render(tokenizer, messages, False, chat_template)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, chat_template)
        upto = _render(tokenizer, messages[: i + 1], False, chat_template)
        start, end = _common_prefix_len(before, upto), len(upto)
        if not full.startswith(upto) or start < cursor:
            # History rewritten by later turns: find this turn's content in the full render, then its suffix.
            content = m["content"]
            body = upto.rfind(content) if content else -1
            pos = full.find(content, cursor) if content else -1
            if body < 0 or pos < 0:
                raise ValueError(f"assistant turn {i}: cannot locate its text in the rendered conversation")
            suffix = upto[body + len(content) :]
            start, end = pos, pos + len(content)
            if suffix and full.startswith(suffix, end):
                end += len(suffix)
        if end > start:
            spans.append((start, end))
            cursor = end
    return full, spans


def tokenize_conversation(
    tokenizer: Any, messages: list[dict], max_length: int, chat_template: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 loss mask that is 1 on assistant tokens only.

    `chat_template` overrides the tokenizer's (template text; see resolve_chat_template). Samples longer than
    `max_length` are truncated (the mask with them).
    """
    full, spans = assistant_spans(tokenizer, messages, chat_template)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        # A token belongs to a turn when it starts inside the turn's span.
        starts = [s for s, _ in enc["offset_mapping"]]
        mask = [0] * len(ids)
        j = 0
        for t, s in enumerate(starts):
            while j < len(spans) and s >= spans[j][1]:
                j += 1
            if j < len(spans) and spans[j][0] <= s < spans[j][1]:
                mask[t] = 1
    else:
        # Slow tokenizers have no offsets: tokenise the render segment by segment at the span boundaries.
        ids, mask, pos = [], [], 0
        for start, end in spans:
            for seg, bit in ((full[pos:start], 0), (full[start:end], 1)):
                seg_ids = tokenizer(seg, add_special_tokens=False)["input_ids"] if seg else []
                ids += seg_ids
                mask += [bit] * len(seg_ids)
            pos = end
        tail = tokenizer(full[pos:], add_special_tokens=False)["input_ids"] if full[pos:] else []
        ids += tail
        mask += [0] * len(tail)
    return ids[:max_length], mask[:max_length]
