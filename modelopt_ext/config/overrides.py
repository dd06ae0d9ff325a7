"""Dotted command-line overrides (`training.lr=1e-4`, `pipeline.task_1.slurm_config.segment=3`) on plain dicts.

Values are parsed as YAML scalars/collections so `3`, `true`, `[1,2]` and `null` get their natural types.
A list of single-key mappings (Model-Optimizer's `environment: [- NAME: value]` form) is addressed by key:
`environment.SERVE_NODES=4` sets that item (or appends it); `environment[2].SERVE_NODES=4` works too.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

import yaml

from modelopt_ext.util.errors import ConfigError

_INDEX = re.compile(r"^(.*)\[(\d+)\]$")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """'a.b[0].c=1' -> (['a', 'b', 0, 'c'], 1)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected KEY.PATH=VALUE"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError([f"override {text!r}: empty key"])
    path: list[str | int] = []
    for part in key.split("."):
        m = _INDEX.match(part)
        indices = []
        while m:
            indices.insert(0, int(m.group(2)))
            part = m.group(1)
            m = _INDEX.match(part)
        if not part:
            raise ConfigError([f"override {text!r}: empty path element"])
        path.append(part)
        path.extend(indices)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Return a deep copy of `data` with every override applied; all bad overrides reported at once."""
    out = copy.deepcopy(data)
    problems = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        path = _keyed_items(out, path)
        node: Any = out
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    problems.append(f"override {text!r}: index [{part}] out of range")
                    break
                node = node[part]
                continue
            if not isinstance(node, dict):
                problems.append(f"override {text!r}: {part!r} is not inside a mapping")
                break
            if node.get(part) is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        else:
            last = path[-1]
            if isinstance(last, int):
                if not isinstance(node, list) or last >= len(node):
                    problems.append(f"override {text!r}: index [{last}] out of range")
                    continue
                node[last] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                problems.append(f"override {text!r}: cannot set {last!r} on a {type(node).__name__}{_index_hint(path)}")
    if problems:
        raise ConfigError(problems)
    return out


def _single_key_items(node: Any) -> bool:
    return isinstance(node, list) and all(isinstance(x, dict) and len(x) == 1 for x in node)


def _keyed_items(data: Any, path: list[str | int]) -> list[str | int]:
    """Rewrite `...list.KEY...` into `...list[i].KEY...` where the list holds single-key mappings.

    The item is the one whose key is KEY; when none has it, a `{KEY: None}` item is appended (the value is
    set afterwards). Several items with KEY are left alone (the caller's error then asks for an index).
    """
    out: list[str | int] = []
    node: Any = data
    for i, part in enumerate(path):
        if isinstance(part, str) and _single_key_items(node):
            hits = [j for j, item in enumerate(node) if part in item]
            if len(hits) > 1:
                return path
            if not hits:
                node.append({part: None})
                hits = [len(node) - 1]
            out.append(hits[0])
            node = node[hits[0]]
        out.append(part)
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return out + list(path[i + 1 :])
    return out


def _index_hint(path: list[str | int]) -> str:
    """'; address an item by index, e.g. environment[0].X=...' for a str key applied to a list."""
    shown = ""
    for part in path[:-1]:
        shown += f"[{part}]" if isinstance(part, int) else ("." if shown else "") + part
    return f"; address a list item by index, e.g. {shown}[0].{path[-1]}=..."


def load_yaml_file(path: str) -> dict:
    """Read a YAML mapping, turning syntax errors and missing files into a one-line ConfigError."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping, got {type(data).__name__}"])
    return data
