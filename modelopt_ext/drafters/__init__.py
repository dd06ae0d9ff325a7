"""Drafters, as plugins: which kinds exist and how a name, a recipe or a folder picks one.

A recipe's `drafter:` is a built-in name (`BUILTIN`) or `package.module:attribute` naming a `Drafter`
instance or class of your own (no change to this project needed; see docs/drafters.md). No torch here.
"""

from __future__ import annotations

import importlib
from typing import Any

from modelopt_ext.drafters.base import Drafter

DEFAULT_DRAFTER = "eagle3"
# name -> "module:attribute" of the built-in drafters (imported only when asked for).
BUILTIN = {
    "eagle3": "modelopt_ext.drafters.eagle3:EAGLE3",
    "dflash": "modelopt_ext.drafters.dflash:DFLASH",
}


class UnknownDrafter(ValueError):
    """A `drafter:` value that names no drafter; the message lists the choices."""


def resolve_drafter(name: str | None) -> Drafter:
    """The drafter called `name` (a built-in name or `module:attribute`); UnknownDrafter otherwise."""
    name = name or DEFAULT_DRAFTER
    ref = BUILTIN.get(name, name)
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise UnknownDrafter(
            f"unknown drafter {name!r} (choices: {', '.join(sorted(BUILTIN))}, or package.module:Attribute)"
        )
    try:
        obj: Any = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownDrafter(f"drafter {name!r}: cannot import {ref} ({e})") from None
    if isinstance(obj, type) and issubclass(obj, Drafter):
        obj = obj()
    if not isinstance(obj, Drafter):
        raise UnknownDrafter(f"drafter {name!r}: {ref} is not a Drafter (see modelopt_ext/drafters/base.py)")
    return obj


def builtin_drafters() -> list[Drafter]:
    """Every built-in drafter (for messages and for recognising folders)."""
    return [resolve_drafter(n) for n in BUILTIN]


def drafter_for_config(config: dict, where: str = "config.json") -> Drafter:
    """The drafter a checkpoint's or export's config.json belongs to.

    Our checkpoints name it (`drafter`); exports are recognised by their engine config. A config that is
    neither raises UnknownDrafter naming `where`.
    """
    named = config.get("drafter")
    if isinstance(named, str):
        return resolve_drafter(named)
    for d in builtin_drafters():
        if d.owns_config(config):
            return d
    arch = config.get("architectures")
    raise UnknownDrafter(
        f"{where}: not a drafter this project knows"
        + (f" (architectures {arch})" if arch else "")
        + f"; built-in drafters: {', '.join(sorted(BUILTIN))}"
    )
