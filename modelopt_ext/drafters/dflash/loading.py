"""Load a DFlash drafter from a folder: a training checkpoint (`epoch_E_step_S/`) or an export.

Both hold `config.json` + `model.safetensors` with the draft's own weights only (the target's embeddings
and lm_head are never stored: the engines use the target's). A checkpoint's config is `DFlashConfig.to_dict()`
(+ `drafter`); an export's is the engines' form (`dflash_config` with block_size, mask_token_id,
target_layer_ids), which `DFlashConfig.from_dict` also reads. Keys are checked strictly, shapes too.
The target's embeddings (and lm_head) are installed by the caller: `target_embeddings` here, the proposer
from the target model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from modelopt_ext.drafters.dflash.modeling import DFlashConfig, DFlashDraftModel


class DrafterLoadError(ValueError):
    """A drafter folder that cannot be loaded; the message names the file and the problem."""


def load_drafter(path: str | Path, target_embeddings: torch.Tensor | None = None) -> DFlashDraftModel:
    """DFlashDraftModel (eval mode, fp32) from a checkpoint or export folder; strict on weight keys."""
    folder = Path(path)
    cfg_file, weights_file = folder / "config.json", folder / "model.safetensors"
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise DrafterLoadError(f"{f}: not found (a drafter folder needs config.json and model.safetensors)")
    try:
        cfg = DFlashConfig.from_dict(json.loads(cfg_file.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise DrafterLoadError(f"{cfg_file}: not a DFlash drafter config ({e})") from None
    # Engines' optional extras that this model does not use: vocab mapping buffers of a full-vocab draft.
    state = {k: v for k, v in load_file(str(weights_file)).items() if k not in ("d2t", "t2d")}
    model = DFlashDraftModel(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DrafterLoadError(f"{weights_file}: missing keys {missing}, unexpected keys {unexpected}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise DrafterLoadError(
                f"{weights_file}: {k} has shape {tuple(v.shape)}, config says {tuple(expected[k].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in state.items()})
    if target_embeddings is not None:
        model.set_target_tensors(target_embeddings.detach().float())
    return model.eval()
