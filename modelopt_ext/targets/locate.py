"""Where a target model is: a local folder with `config.json`, or a hub id already in the local HF cache.

Every command that takes a target (`model.path` in a recipe, `--target`, `--model`) resolves it here first,
so a typo is one line naming the field and the path (exit 2 in the CLIs) instead of a loader traceback or
transformers' "Repo id must be in the form ...". Nothing is downloaded: nodes have no network, so a hub id
counts only when its `config.json` is in the local Hugging Face cache. No torch import (CLIs answer fast).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from modelopt_ext.util.fileio import read_json_object

# `org/name`: what a hub id looks like (a relative path with more than one part, or odd characters, is not).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class TargetPathError(ValueError):
    """A target that is neither a model folder nor a cached hub id; the message is one line."""


def looks_like_hub_id(text: str) -> bool:
    """True for `org/name` that is not written as a path (`./x`, `/x`, `~/x`)."""
    return bool(HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_target(target: str | os.PathLike, field: str = "target") -> Path:
    """The folder holding the target's `config.json`: the local folder itself, or the hub id's cached snapshot.

    `field` names where the value came from (`model.path`, `--target`, `--model`) in the error, e.g.
    `model.path 'outputs/tiny/targte': no such folder (and not a hub id like org/name)`.
    Raises TargetPathError.
    """
    text = os.fspath(target)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise TargetPathError(f"{field} {text!r}: a folder without config.json (not a model folder)")
    if path.exists():
        raise TargetPathError(f"{field} {text!r}: not a folder (a model folder holds config.json)")
    if not looks_like_hub_id(text):
        raise TargetPathError(f"{field} {text!r}: no such folder (and not a hub id like org/name)")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(text, "config.json")
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached).parent
    raise TargetPathError(
        f"{field} {text!r}: no such folder, and no hub model of that name in the local Hugging Face cache "
        f"({_hub_cache_dir()}); give a model folder, or download the model there first"
    )


def target_config(target: str | os.PathLike, field: str = "target") -> dict:
    """The target's `config.json` as a dict (TargetPathError naming `field` when missing or unreadable)."""
    cfg_file = resolve_target(target, field) / "config.json"
    try:
        return read_json_object(cfg_file)
    except ValueError as e:
        raise TargetPathError(f"{field} {os.fspath(target)!r}: {e}") from None
