"""Benchmark prompts from a JSONL file -> token ids.

Each line is one of:
  {"input_ids": [..]}                        token ids, used as they are;
  {"prompt": "..."} / {"text": "..."}        one user message;
  {"messages": [{"role", "content"}..]}      OpenAI form, or
  {"conversations": [{"from", "value"}..]}   ShareGPT form: the turns before the first assistant turn;
  a line that is not JSON                    one user message.
Text goes through the tokenizer's chat template with a generation prompt (plain encoding when the
tokenizer has no template), which is how a served chat model sees it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bot": "assistant",
    "model": "assistant",
}


class PromptFileError(ValueError):
    """A prompts file problem; the message names the file and line."""


def _messages(obj: dict, where: str) -> list[dict]:
    """The turns before the first assistant turn. Conversations with an assistant turn go through the
    training reader (same role aliases and content forms); prompt-only ones through the fallback below."""
    from modelopt_ext.data.conversations import parse_conversation

    try:
        conv = parse_conversation(obj)
    except ValueError:
        conv = None
    if conv is not None:
        head = []
        for m in conv:
            if m["role"] == "assistant":
                break
            head.append(m)
        if any(m["role"] == "user" for m in head):
            return head
        raise PromptFileError(f"{where}: no user turn before the first assistant turn")
    if "messages" in obj:
        raw = obj["messages"]
        conv = [{"role": m.get("role"), "content": m.get("content")} for m in raw if isinstance(m, dict)]
    else:
        raw = obj["conversations"]
        conv = [
            {"role": m.get("from", m.get("role")), "content": m.get("value", m.get("content"))}
            for m in raw
            if isinstance(m, dict)
        ]
    out = []
    for m in conv:
        role = _ROLES.get(str(m["role"]).lower())
        if role is None or not isinstance(m["content"], str):
            raise PromptFileError(f"{where}: message with role {m['role']!r} / non-text content")
        if role == "assistant":
            break
        out.append({"role": role, "content": m["content"]})
    if not any(m["role"] == "user" for m in out):
        raise PromptFileError(f"{where}: no user turn before the first assistant turn")
    return out


def _encode(tokenizer: Any, messages: list[dict]) -> list[int]:
    if tokenizer is None:
        raise PromptFileError("text prompts need a tokenizer in the target folder")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = "\n".join(m["content"] for m in messages)
    return [int(i) for i in tokenizer(text)["input_ids"]]


def read_prompts(path: str | Path, tokenizer: Any = None, limit: int | None = None) -> list[list[int]]:
    """Token ids of each prompt in `path` (module docstring); blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: not found")
    prompts: list[list[int]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if limit is not None and len(prompts) >= limit:
            break
        line = line.strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = line
        if isinstance(obj, str):
            ids = _encode(tokenizer, [{"role": "user", "content": obj}])
        elif isinstance(obj, dict) and "input_ids" in obj:
            ids = obj["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise PromptFileError(f"{where}: input_ids must be a list of non-negative integers")
        elif isinstance(obj, dict) and ("messages" in obj or "conversations" in obj):
            ids = _encode(tokenizer, _messages(obj, where))
        elif isinstance(obj, dict) and isinstance(obj.get("prompt", obj.get("text")), str):
            ids = _encode(tokenizer, [{"role": "user", "content": obj.get("prompt", obj.get("text"))}])
        else:
            raise PromptFileError(f"{where}: expected input_ids, prompt/text, messages or conversations")
        if not ids:
            raise PromptFileError(f"{where}: empty prompt")
        prompts.append(list(ids))
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts


def prompt_set_name(path: str | Path, used: int) -> str:
    """How a report names the prompts it measured: the file and how many of its prompts were used."""
    return f"{Path(path).name} ({used} prompt{'s' if used != 1 else ''})"


class _DeprecatedAlias(argparse.Action):
    """An old option name: stores into the new option's dest and says once, on stderr, what to use."""

    def __init__(self, option_strings, dest, new_name: str = "", **kw):
        self.new_name = new_name
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.new_name} (same meaning)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_max_prompts_option(parser: argparse.ArgumentParser) -> None:
    """`--max-prompts N` (the first N prompts of the file), shared by every acceptance CLI so they name it
    the same way; `--limit` stays as a deprecated alias."""
    parser.add_argument(
        "--max-prompts", type=int, default=None, help="use only the first N prompts of the file"
    )
    parser.add_argument(
        "--limit", type=int, dest="max_prompts", action=_DeprecatedAlias, new_name="--max-prompts",
        help=argparse.SUPPRESS,
    )  # fmt: skip


def decode_options_error(args: argparse.Namespace) -> str | None:
    """The one-line problem with an acceptance CLI's decoding options (None when they are fine): counts
    >= 1, temperature >= 0, top-p in (0, 1]. Options a CLI does not have are not checked."""
    for name in ("num_steps", "max_new_tokens", "max_prompts"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if not getattr(args, "temperature", 0.0) >= 0.0 or not 0.0 < getattr(args, "top_p", 1.0) <= 1.0:
        return "--temperature must be >= 0 and --top-p in (0, 1]"
    return None
