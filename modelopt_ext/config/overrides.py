"""Dotted command-line overrides (`training.lr=1e-4`, `pipeline.task_1.slurm_config.segment=3`) on plain dicts.

Values are parsed as YAML scalars/collections so `3`, `true`, `[1,2]` and `null` get their natural types.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

import yaml

from modelopt_ext.config.errors import ConfigError

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
                problems.append(f"override {text!r}: cannot set {last!r} on a {type(node).__name__}")
    if problems:
        raise ConfigError(problems)
    return out


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
