"""Turn validation failures into one line per problem, each naming the field path and what is allowed.

Both the launcher (job specs) and the trainer (recipes) report bad input this way and exit with code 2.
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, NoReturn

from pydantic import BaseModel, ValidationError

EXIT_BAD_INPUT = 2


class ConfigError(Exception):
    """A configuration problem report: one human-readable line per problem."""

    def __init__(self, problems: Iterable[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(self.problems))

    def lines(self) -> list[str]:
        """Problems prefixed with the file they come from, when known."""
        prefix = f"{self.source}: " if self.source else ""
        return [f"{prefix}{p}" for p in self.problems]


def exit_with(err: ConfigError, stream=None) -> NoReturn:
    """Print every problem on its own line to stderr and exit with code 2 (no traceback)."""
    stream = stream or sys.stderr
    for line in err.lines():
        print(f"error: {line}", file=stream)
    raise SystemExit(EXIT_BAD_INPUT)


def format_loc(loc: Iterable[Any]) -> str:
    """('pipeline', 'task_1', 'args', 0) -> 'pipeline.task_1.args[0]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _unwrap(annotation: Any) -> list[Any]:
    """Candidate classes an annotation may hold (Optional/Union/list/dict values unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out = []
        for arg in typing.get_args(annotation):
            out.extend(_unwrap(arg))
        return out
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (list, tuple, set, frozenset):
        args = typing.get_args(annotation)
        return _unwrap(args[0]) if args else []
    if origin is dict:
        args = typing.get_args(annotation)
        return _unwrap(args[1]) if len(args) == 2 else []
    return [annotation]


def model_at(model: type[BaseModel], loc: Iterable[Any]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (the parent of the last element)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(part) or next(
            (f for f in current.model_fields.values() if f.alias == part), None
        )
        if field is None:
            # A dict-valued field (e.g. task_N entries) keeps the model of its values.
            continue
        nxt = [c for c in _unwrap(field.annotation) if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nxt:
            return None
        current = nxt[0]
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def allowed_keys(model: type[BaseModel]) -> list[str]:
    """Field names (and aliases) a model accepts from a user (fields marked `exclude=True` are internal)."""
    return [field.alias or name for name, field in model.model_fields.items() if not field.exclude]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or '' when nothing is close."""
    close = did_you_mean_word(word, choices)
    return f" (did you mean '{close}'?)" if close else ""


def problems_from_validation(
    err: ValidationError,
    model: type[BaseModel],
    prefix: str = "",
    *,
    hidden: Collection[str] = (),
    extra_choices: Callable[[type[BaseModel] | None], tuple[list[str], list[str]]] | None = None,
    key_hint: Callable[[type[BaseModel] | None, str], str | None] | None = None,
) -> list[str]:
    """One line per pydantic error: field path, what was wrong, and what is allowed.

    `hidden` names internal location parts left out of paths and key lists (e.g. a field that collects
    `task_N` entries). `extra_choices(owner)` returns (extra did-you-mean candidates, extra allowed-key
    labels) for an unknown key under `owner`, for models that accept keys by pattern. `key_hint(owner, key)`
    may return a specific hint for an unknown key (e.g. another tool's name for a field), used instead.
    """
    lines = []
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        path = format_loc(([prefix] if prefix else []) + [p for p in loc if p not in hidden])
        kind = e["type"]
        if kind == "extra_forbidden":
            owner = model_at(model, loc[:-1])
            special = key_hint(owner, str(loc[-1])) if key_hint is not None else None
            if special:
                lines.append(f"{path}: {special}")
                continue
            keys = [k for k in (allowed_keys(owner) if owner else []) if k not in hidden]
            choices = list(keys)
            if extra_choices is not None:
                more_choices, more_labels = extra_choices(owner)
                choices += more_choices
                keys += more_labels
            hint = did_you_mean(loc[-1], choices)
            allowed = f"; allowed keys: {', '.join(sorted(keys))}" if keys else ""
            lines.append(f"{path}: unknown key{hint}{allowed}")
        elif kind == "missing":
            lines.append(f"{path}: required field is missing")
        elif kind in ("literal_error", "enum"):
            expected = e.get("ctx", {}).get("expected", "")
            lines.append(f"{path}: got {e.get('input')!r}; allowed: {expected}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = e.get("input")
            got = (
                ""
                if isinstance(shown, (dict, list)) or kind.startswith("value_error")
                else f" (got {shown!r})"
            )
            lines.append(f"{path}: {msg}{got}")
    return lines


def key_problem(
    model: type[BaseModel], dotted: str, *, prefix: Sequence[str] = (), extra_keys: Iterable[str] = ()
) -> str | None:
    """Why `dotted` (e.g. 'training.lrr') names no field of `model`, or None when it does.

    Walks nested models; a path that enters a non-model field (a list, a scalar) is left to validation.
    `prefix`: where `model` sits in a larger document (for the messages); `extra_keys`: keys the top level
    also accepts that `model` does not declare (they are checked by their own owners).
    """
    current: Any = model
    parts = [*prefix, *dotted.split(".")]
    for i, part in enumerate(parts):
        if i < len(prefix):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        keys = allowed_keys(current) + (list(extra_keys) if i == len(prefix) else [])
        if part not in keys:
            where = ".".join(parts[:i])
            close = did_you_mean_word(part, keys)
            hint = f" (did you mean '{'.'.join([*parts[:i], close])}'?)" if close else ""
            return f"unknown key{hint}; allowed{' under ' + where if where else ''}: {', '.join(sorted(keys))}"
        field = current.model_fields.get(part) or next(
            (f for f in current.model_fields.values() if f.alias == part), None
        )
        if field is None:  # one of `extra_keys`: its owner checks below it
            return None
        nxt = [c for c in _unwrap(field.annotation) if isinstance(c, type) and issubclass(c, BaseModel)]
        current = nxt[0] if nxt else None
    return None


def did_you_mean_word(word: str, choices: Iterable[str]) -> str | None:
    """The closest choice to `word`, or None."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return close[0] if close else None
