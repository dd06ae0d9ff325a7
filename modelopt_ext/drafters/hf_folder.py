"""The HF-style folder every drafter's export is: config.json + model.safetensors (+ index), written atomically.

Shared by the drafters' format modules (`drafters/<name>/hf_format.py`); what goes INTO the folder is the
drafter's business.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from modelopt_ext.util.fileio import read_json_object, replace_dir_atomically

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab_mapping.safetensors"
# vLLM loads every *.safetensors in the folder unless this index names the weight files; without it,
# vocab_mapping.safetensors is loaded as weights and a full-vocabulary drafter fails to load
# ("no module or parameter named 'draft_id_to_target_id'"). SGLang honours the same index.
INDEX_FILE = "model.safetensors.index.json"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # what export --dtype accepts


class ExportError(Exception):
    """A checkpoint or export that cannot be used; the message is one line naming the file."""


def read_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise ExportError(str(e)) from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable safetensors ({e})") from None


def check_keys(
    path: Path, tensors: dict[str, Any], expected: list[str], optional: tuple[str, ...] = ()
) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected and k not in optional)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise ExportError(f"{path}: {'; '.join(parts)}")


def write_folder(
    out: Path,
    weights: dict[str, torch.Tensor],
    config: dict,
    *,
    overwrite: bool = True,
    extra: Callable[[Path], Any] | None = None,
) -> Path:
    """Write `out` atomically: the weights, their index, config.json, and whatever `extra(tmp)` adds."""
    from safetensors.torch import save_file

    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists")
    with replace_dir_atomically(out) as tmp:
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        index = {
            "metadata": {"total_size": sum(w.numel() * w.element_size() for w in weights.values())},
            "weight_map": {k: MODEL_FILE for k in sorted(weights)},
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if extra is not None:
            extra(tmp)
    return out


def read_folder(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, weights) of an exported folder, checking the index lists exactly the weights."""
    config = read_json(out / CONFIG_FILE)
    weights = load_tensors(out / MODEL_FILE)
    index = read_json(out / INDEX_FILE)
    if set(index.get("weight_map", {}).values()) != {MODEL_FILE} or set(index["weight_map"]) != set(weights):
        raise ExportError(f"{out / INDEX_FILE}: weight_map must list exactly the tensors of {MODEL_FILE}")
    return config, weights


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for an export `--dtype` name; ExportError naming the choices otherwise."""
    import torch

    if name not in DTYPE_NAMES:
        raise ExportError(f"dtype {name!r} not one of {sorted(DTYPE_NAMES)}")
    return getattr(torch, name)


def weight_keys(folder: Path) -> list[str]:
    """Tensor names of the folder's weight files (not the vocabulary mapping), read from the headers only."""
    from safetensors import safe_open

    keys: list[str] = []
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == VOCAB_FILE:
            continue
        with safe_open(str(f), framework="pt") as h:
            keys.extend(h.keys())
    return keys


def infer_num_layers(keys: list[str]) -> int:
    """Decoder layers in the weights: distinct `layers.N.` indices (`midlayer.` counts as one)."""
    import re

    idx = {int(m.group(1)) for k in keys if (m := re.match(r"^(?:model\.)?layers\.(\d+)\.", k))}
    if idx:
        return max(idx) + 1
    return 1 if any(k.startswith(("midlayer.", "model.midlayer.")) for k in keys) else 0
