"""What SGLang's EAGLE-3 model needs from a drafter folder beyond what vLLM needs (`Eagle3.sglang_folder`).

- `architectures: ["LlamaForCausalLMEagle3"]` and `num_hidden_layers` equal to the layers in the weights
  (older exports name other architectures or keep the target's layer count);
- the decoder layer's weights named `midlayer.*`, as SGLang's EAGLE-3 model (and SpecForge) name it; our
  exports and vLLM use `layers.0.*` (vLLM maps `midlayer.` to it), so the SGLang copy renames them
  (option `layer_name: layers.0` keeps them, for an SGLang that reads that name);
- a token map (`--speculative-token-map`, a .pt of the draft vocabulary's target ids) when the draft vocabulary
  is smaller than the target's and the weights carry no `d2t` for SGLang to derive it from; it is regenerated
  from the vocabulary metadata (`vocab_mapping.safetensors`, or `t2d` in the weights). Option `token_map`:
  auto (only then), always, never.
Parallel-drafting (P-EAGLE) heads are refused: SGLang cannot serve them. No torch at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from modelopt_ext.drafters.base import SglangFolder
from modelopt_ext.drafters.eagle3.identity import parallel_drafting_reason
from modelopt_ext.drafters.hf_folder import infer_num_layers, read_json, weight_keys

if TYPE_CHECKING:
    import torch

LAYER_NAMES = ("midlayer", "layers.0")
TOKEN_MAP_MODES = ("auto", "always", "never")
_LAYER_PREFIXES = ("layers.0.", "midlayer.")


def _vocab_ids(folder: Path, keys: list[str]) -> torch.Tensor | None:
    """Target ids of the draft vocabulary from the folder's metadata, or None when there is none."""
    import torch
    from safetensors.torch import load_file

    from modelopt_ext.data.draft_vocab import DraftVocab

    if (folder / "vocab_mapping.safetensors").is_file():
        return DraftVocab.load(folder).selected_ids
    if "t2d" in keys:
        for f in sorted(folder.glob("*.safetensors")):
            tensors = load_file(str(f))
            if "t2d" in tensors:
                return tensors["t2d"].bool().nonzero().flatten().to(torch.int64)
    return None


def _num_layers(keys: list[str]) -> int:
    return infer_num_layers(keys)


def sglang_folder(
    folder: Path, *, exported: bool, options: dict[str, str], architecture: str
) -> SglangFolder:
    """The changes SGLang's EAGLE-3 model needs in `folder` (see the module docstring); ValueError when it
    cannot serve the folder at all."""
    layer_name = options.get("layer_name") or "midlayer"
    token_map_mode = options.get("token_map") or "auto"
    if layer_name not in LAYER_NAMES:
        raise ValueError(f"--layer-name must be midlayer or layers.0, got {layer_name!r}")
    if token_map_mode not in TOKEN_MAP_MODES:
        raise ValueError(f"--token-map must be one of {', '.join(TOKEN_MAP_MODES)}, got {token_map_mode!r}")
    want = f"{layer_name}."
    plan = SglangFolder()
    if exported:
        # Our export (written first): LlamaForCausalLMEagle3, one layer named layers.0, d2t for a reduced
        # vocabulary. SGLang needs only the layer renamed (unless told otherwise) and a token map if asked.
        if layer_name == "midlayer":
            plan.rename = ("layers.0.", want)
            plan.notes.append("weights renamed layers.0.* -> midlayer.* (the decoder layer's name in SGLang)")
        plan.token_map_pending = token_map_mode == "always"
        return plan
    cfg = read_json(folder / "config.json")
    keys = weight_keys(folder)
    reason = parallel_drafting_reason(cfg, keys)
    if reason:
        raise ValueError(
            f"--draft {folder} is a parallel-drafting (P-EAGLE) head ({reason}); SGLang cannot serve it. "
            "Serve it with vLLM (python -m modelopt_ext.serve_vllm), or train a standard EAGLE-3 head for SGLang"
        )
    if not keys:
        raise ValueError(f"--draft {folder}: no *.safetensors weights")
    if cfg.get("architectures") != [architecture]:
        plan.config_changes["architectures"] = [architecture]
    layers = _num_layers(keys)
    if layers == 0:
        raise ValueError(f"--draft {folder}: no decoder layer weights (layers.N.* or midlayer.*)")
    if cfg.get("num_hidden_layers") != layers:
        plan.config_changes["num_hidden_layers"] = layers
    if plan.config_changes:
        plan.notes.append(f"SGLang config fixes: {plan.config_changes}")
    other = next(p for p in _LAYER_PREFIXES if p != want)
    if layers == 1 and any(k.startswith(other) for k in keys):
        plan.rename = (other, want)
        plan.notes.append(
            f"weights renamed {other}* -> {want}* (the decoder layer's name in SGLang's EAGLE-3 model)"
        )
    vocab, draft_vocab = cfg.get("vocab_size"), cfg.get("draft_vocab_size")
    reduced = isinstance(vocab, int) and isinstance(draft_vocab, int) and draft_vocab < vocab
    if token_map_mode == "always" or (token_map_mode == "auto" and reduced and "d2t" not in keys):
        ids = _vocab_ids(folder, keys)
        if ids is None:
            raise ValueError(
                f"--draft {folder}: the draft vocabulary ({draft_vocab}) is smaller than the target's ({vocab}) but "
                "there is no d2t, vocab_mapping.safetensors or t2d to map draft ids to target ids"
            )
        if isinstance(draft_vocab, int) and ids.numel() != draft_vocab:
            raise ValueError(
                f"--draft {folder}: vocabulary metadata has {ids.numel()} ids, config says {draft_vocab}"
            )
        plan.token_ids = ids
        plan.notes.append(f"token map of {ids.numel()} target ids regenerated from the vocabulary metadata")
    return plan
