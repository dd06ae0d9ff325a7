"""What SGLang's EAGLE-3 model needs from a drafter folder, beyond what vLLM needs (`Eagle3.sglang_folder`).

- `architectures: ["LlamaForCausalLMEagle3"]` and `num_hidden_layers` equal to the layers in the weights
  (older exports name other architectures or keep the target's layer count);
- the decoder layer's weights named `midlayer.*`, as SGLang's EAGLE-3 model (and SpecForge) name it; our
  exports and vLLM use `layers.0.*` (vLLM maps `midlayer.` to it), so the SGLang copy renames them
  (`--layer-name layers.0` keeps them, for an SGLang that reads that name);
- a token map (`--speculative-token-map`, a .pt of the draft vocabulary's target ids) when the draft vocabulary
  is smaller than the target's and the weights carry no `d2t` for SGLang to derive it from; it is regenerated
  from the vocabulary metadata (`vocab_mapping.safetensors`, or `t2d` in the weights).
Parallel-drafting (P-EAGLE) heads are refused: SGLang cannot serve them.
"""

from __future__ import annotations

from pathlib import Path

from modelopt_ext.drafters.base import SglangFolder
from modelopt_ext.drafters.eagle3.identity import ARCHITECTURE, parallel_drafting_reason
from modelopt_ext.drafters.hf_folder import (
    ExportError,
    draft_vocab_ids,
    infer_num_layers,
    read_json,
    weight_keys,
)

LAYER_NAMES = ("midlayer", "layers.0")  # SGLang's name for the decoder layer, ours (and vLLM's)


def sglang_folder(folder: Path, *, fresh_export: bool, token_map: str, layer_name: str | None) -> SglangFolder:
    """See the module docstring; `fresh_export`: our export of a checkpoint (layers.0, d2t), not written yet."""
    layer_name = layer_name or "midlayer"
    if layer_name not in LAYER_NAMES:
        raise ExportError(f"--layer-name must be midlayer or layers.0, got {layer_name!r}")
    want = f"{layer_name}."
    if fresh_export:
        # Our export: LlamaForCausalLMEagle3, one layer named layers.0, d2t for a reduced vocabulary. SGLang
        # needs only the layer renamed (unless told otherwise) and a token map if asked.
        out = SglangFolder(token_ids_pending=token_map == "always")
        if layer_name == "midlayer":
            out.rename = ("layers.0.", want)
            out.notes.append("weights renamed layers.0.* -> midlayer.* (the decoder layer's name in SGLang)")
        return out
    cfg = read_json(folder / "config.json")
    keys = weight_keys(folder)
    reason = parallel_drafting_reason(cfg, keys)
    if reason:
        raise ExportError(
            f"{folder} is a parallel-drafting (P-EAGLE) head ({reason}); SGLang cannot serve it. "
            "Serve it with vLLM (python -m modelopt_ext.serve_vllm), or train a standard EAGLE-3 head for SGLang"
        )
    if not keys:
        raise ExportError(f"{folder}: no *.safetensors weights")
    out = SglangFolder()
    if cfg.get("architectures") != [ARCHITECTURE]:
        out.config_changes["architectures"] = [ARCHITECTURE]
    layers = infer_num_layers(keys)
    if layers == 0:
        raise ExportError(f"{folder}: no decoder layer weights (layers.N.* or midlayer.*)")
    if cfg.get("num_hidden_layers") != layers:
        out.config_changes["num_hidden_layers"] = layers
    if out.config_changes:
        out.notes.append(f"SGLang config fixes: {out.config_changes}")
    other = next(f"{n}." for n in LAYER_NAMES if f"{n}." != want)
    if layers == 1 and any(k.startswith(other) for k in keys):
        out.rename = (other, want)
        out.notes.append(f"weights renamed {other}* -> {want}* (the decoder layer's name in SGLang's EAGLE-3 model)")
    vocab, draft_vocab = cfg.get("vocab_size"), cfg.get("draft_vocab_size")
    reduced = isinstance(vocab, int) and isinstance(draft_vocab, int) and draft_vocab < vocab
    if token_map == "always" or (token_map == "auto" and reduced and "d2t" not in keys):
        ids = draft_vocab_ids(folder, keys)
        if ids is None:
            raise ExportError(
                f"{folder}: the draft vocabulary ({draft_vocab}) is smaller than the target's ({vocab}) but "
                "there is no d2t, vocab_mapping.safetensors or t2d to map draft ids to target ids"
            )
        if isinstance(draft_vocab, int) and ids.numel() != draft_vocab:
            raise ExportError(f"{folder}: vocabulary metadata has {ids.numel()} ids, config says {draft_vocab}")
        out.token_ids = ids
        out.notes.append(f"token map of {ids.numel()} target ids regenerated from the vocabulary metadata")
    return out
