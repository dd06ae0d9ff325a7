"""Load an EAGLE-3 drafter from a folder: a training checkpoint (`epoch_E_step_S/`) or an export.

Both hold `config.json` + `model.safetensors`. A checkpoint keeps `embed_tokens.weight` and the vocab
mapping buffers; an export (what vLLM/SGLang load) drops `embed_tokens.weight` because the serving engine
shares the target's, so the caller passes the target's embeddings. `d2t` may be missing from older exports
(then `vocab_mapping.safetensors` next to it, or identity when the draft vocab is the full vocab); `t2d`
is rebuilt from `d2t` when absent. Older SGLang checkpoints named the layer `midlayer.`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from modelopt_ext.drafters.eagle3.modeling import Eagle3Config, Eagle3DraftModel


class DrafterLoadError(ValueError):
    """A drafter folder that cannot be loaded; the message names the file and the problem."""


def load_drafter(path: str | Path, target_embeddings: torch.Tensor | None = None) -> Eagle3DraftModel:
    """Eagle3DraftModel (eval mode, fp32) from a checkpoint or export folder; strict on weight keys."""
    folder = Path(path)
    cfg_file, weights_file = folder / "config.json", folder / "model.safetensors"
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise DrafterLoadError(
                f"{f}: not found (a drafter folder needs config.json and model.safetensors)"
            )
    try:
        cfg = Eagle3Config.from_dict(json.loads(cfg_file.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise DrafterLoadError(f"{cfg_file}: not an EAGLE-3 drafter config ({e})") from None
    state = {k.replace("midlayer.", "layers.0."): v for k, v in load_file(str(weights_file)).items()}
    model = Eagle3DraftModel(cfg)
    if "embed_tokens.weight" not in state:
        if target_embeddings is None:
            raise DrafterLoadError(
                f"{weights_file}: has no embed_tokens.weight; pass the target's embeddings"
            )
        state["embed_tokens.weight"] = target_embeddings.detach().float().cpu()
    if "d2t" not in state:
        mapping = folder / "vocab_mapping.safetensors"
        if mapping.is_file():
            state.update({k: v for k, v in load_file(str(mapping)).items() if k in ("d2t", "t2d")})
        elif cfg.draft_vocab_size == cfg.vocab_size:
            state["d2t"] = torch.zeros(cfg.draft_vocab_size, dtype=torch.long)
        else:
            raise DrafterLoadError(
                f"{weights_file}: has no d2t and the draft vocabulary is not the full vocabulary"
            )
    if "t2d" not in state:
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[torch.arange(len(state["d2t"])) + state["d2t"].long()] = True
        state["t2d"] = t2d
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise DrafterLoadError(f"{weights_file}: missing keys {missing}, unexpected keys {unexpected}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(model.state_dict()[k].shape):
            raise DrafterLoadError(
                f"{weights_file}: {k} has shape {tuple(v.shape)}, config says {tuple(model.state_dict()[k].shape)}"
            )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()
