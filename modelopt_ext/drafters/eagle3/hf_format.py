"""EAGLE-3's serialized format: a training checkpoint -> the folder vLLM and SGLang load, and checks of it.

Output (docs/export.md):
- `model.safetensors`: exactly EXPORT_KEYS (+ `d2t` when the draft vocabulary is smaller than the target's,
  + `t2d` optionally); the draft's `embed_tokens` is dropped (vLLM and SGLang share the target's);
- `config.json`: `LlamaForCausalLMEagle3`, one layer, draft/target vocab and hidden sizes, and the aux layer
  ids at the TOP level as `eagle_aux_hidden_state_layer_ids` in vLLM's numbering (vLLM reads only the top
  level; a nested copy is kept in `eagle_config` because vLLM sizes `fc` from that list's length);
- `vocab_mapping.safetensors`: d2t/t2d, for tools that regenerate a token map (serve_sglang).
The folder appears atomically (temp dir + rename) or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from modelopt_ext.drafters.eagle3.identity import ARCHITECTURE
from modelopt_ext.drafters.hf_folder import (
    CONFIG_FILE,
    MODEL_FILE,
    VOCAB_FILE,
    ExportError,
    check_keys,
    load_tensors,
    read_folder,
    read_json,
    torch_dtype,
    write_folder,
)

LAYER_KEYS = [
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
    "layers.0.input_layernorm.weight",
    "layers.0.hidden_norm.weight",
    "layers.0.post_attention_layernorm.weight",
]
# Weights every export holds; `d2t` joins them when the draft vocabulary is reduced.
EXPORT_KEYS = ["fc.weight", *LAYER_KEYS, "norm.weight", "lm_head.weight"]
# What a training checkpoint's model.safetensors holds (Eagle3DraftModel.state_dict()).
CHECKPOINT_KEYS = ["embed_tokens.weight", *EXPORT_KEYS, "d2t", "t2d"]
def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of the exported weights for a draft config (Eagle3Config fields)."""
    h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    nh, hd = int(cfg["num_attention_heads"]), int(cfg["head_dim"])
    nkv = int(cfg.get("num_key_value_heads") or nh)
    th = int(cfg.get("target_hidden_size") or h)
    n_aux = len(cfg["aux_layer_ids"])
    vd = int(cfg["draft_vocab_size"])
    return {
        "fc.weight": (h, n_aux * th),
        "layers.0.self_attn.q_proj.weight": (nh * hd, 2 * h),
        "layers.0.self_attn.k_proj.weight": (nkv * hd, 2 * h),
        "layers.0.self_attn.v_proj.weight": (nkv * hd, 2 * h),
        "layers.0.self_attn.o_proj.weight": (h, nh * hd),
        "layers.0.mlp.gate_proj.weight": (inter, h),
        "layers.0.mlp.up_proj.weight": (inter, h),
        "layers.0.mlp.down_proj.weight": (h, inter),
        "layers.0.input_layernorm.weight": (h,),
        "layers.0.hidden_norm.weight": (h,),
        "layers.0.post_attention_layernorm.weight": (h,),
        "norm.weight": (h,),
        "lm_head.weight": (vd, h),
        "d2t": (vd,),
        "t2d": (int(cfg["vocab_size"]),),
    }


def _check_shapes(path: Path, tensors: dict[str, torch.Tensor], cfg: dict) -> None:
    bad = [
        f"{k} {tuple(tensors[k].shape)} != {shape}"
        for k, shape in expected_shapes(cfg).items()
        if k in tensors and tuple(tensors[k].shape) != shape
    ]
    if bad:
        raise ExportError(f"{path}: shapes do not match config.json: {'; '.join(bad)}")


def hf_config(cfg: dict, *, torch_dtype: str, target_model: str | None) -> dict:
    """The exported `config.json` for a draft config (Eagle3Config.to_dict() form)."""
    ids = [int(i) for i in cfg["aux_layer_ids"]]
    h = int(cfg["hidden_size"])
    out = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": h,
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_attention_heads": int(cfg["num_attention_heads"]),
        "num_key_value_heads": int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        "head_dim": int(cfg["head_dim"]),
        "hidden_act": cfg.get("hidden_act", "silu"),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(cfg.get("rope_theta", 10000.0)),
        "rope_scaling": cfg.get("rope_scaling"),
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 4096)),
        "vocab_size": int(cfg["vocab_size"]),
        "draft_vocab_size": int(cfg["draft_vocab_size"]),
        "target_hidden_size": int(cfg.get("target_hidden_size") or h),
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": torch_dtype,
        # vLLM numbering (id k = residual stream after k target decoder layers); vLLM reads the top level.
        "eagle_aux_hidden_state_layer_ids": ids,
        "num_aux_hidden_states": len(ids),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True},
    }
    if target_model:
        out["target_model"] = target_model
    return out


def load_checkpoint_for_export(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict, Any]:
    """Read and strictly check a training checkpoint: (state dict, draft config, DraftVocab)."""
    from modelopt_ext.data.draft_vocab import DraftVocab

    ckpt = Path(ckpt_dir)
    cfg = read_json(ckpt / CONFIG_FILE)
    need = [
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "head_dim",
        "vocab_size",
        "draft_vocab_size",
        "aux_layer_ids",
    ]
    missing = [k for k in need if k not in cfg]
    if missing:
        raise ExportError(f"{ckpt / CONFIG_FILE}: missing fields {missing}")
    state = load_tensors(ckpt / MODEL_FILE)
    check_keys(ckpt / MODEL_FILE, state, CHECKPOINT_KEYS)
    _check_shapes(ckpt / MODEL_FILE, state, cfg)
    vocab_file = ckpt / VOCAB_FILE
    try:
        vocab = (
            DraftVocab.load(vocab_file) if vocab_file.is_file() else DraftVocab(state["d2t"], state["t2d"])
        )
    except (ValueError, OSError) as e:
        raise ExportError(f"{vocab_file}: {e}") from None
    if not (torch.equal(vocab.d2t, state["d2t"].long()) and torch.equal(vocab.t2d, state["t2d"].bool())):
        raise ExportError(f"{vocab_file}: d2t/t2d differ from the buffers in {ckpt / MODEL_FILE}")
    return state, cfg, vocab


def export(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    include_t2d: bool = False,
    overwrite: bool = True,
) -> Path:
    """Export `ckpt_dir` (a training checkpoint) to `out_dir` (atomic). Returns `out_dir`.

    `dtype` casts the floating weights (default: as trained); `include_t2d` also writes `t2d` into the
    weights (vLLM and SGLang skip it; the mapping is always in vocab_mapping.safetensors).
    """
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    state, cfg, vocab = load_checkpoint_for_export(ckpt)
    cast = torch_dtype(dtype) if dtype is not None else None
    weights: dict[str, torch.Tensor] = {}
    for k in EXPORT_KEYS:
        w = state[k]
        weights[k] = (w.to(cast) if cast is not None else w).contiguous()
    # vLLM allocates draft_id_to_target_id only for a reduced vocabulary and rejects a d2t otherwise.
    if not vocab.is_identity:
        weights["d2t"] = vocab.d2t.to(torch.int64).contiguous()
    if include_t2d:
        weights["t2d"] = vocab.t2d.to(torch.bool).contiguous()
    dtype_name = dtype or str(state["fc.weight"].dtype).removeprefix("torch.")
    config = hf_config(cfg, torch_dtype=dtype_name, target_model=cfg.get("target_model"))

    return write_folder(out, weights, config, overwrite=overwrite, extra=vocab.save)


def check_export(out_dir: str | Path) -> dict:
    """Strictly check an exported folder (keys, dtypes, config); returns its config. Raises ExportError."""
    out = Path(out_dir)
    config = read_json(out / CONFIG_FILE)
    if config.get("architectures") != [ARCHITECTURE]:
        raise ExportError(
            f"{out / CONFIG_FILE}: architectures is {config.get('architectures')}, expected [{ARCHITECTURE!r}]"
        )
    if not config.get("eagle_aux_hidden_state_layer_ids"):
        raise ExportError(
            f"{out / CONFIG_FILE}: no top-level eagle_aux_hidden_state_layer_ids (vLLM would silently use other layers)"
        )
    config, weights = read_folder(out)
    reduced = int(config["draft_vocab_size"]) < int(config["vocab_size"])
    check_keys(out / MODEL_FILE, weights, EXPORT_KEYS + (["d2t"] if reduced else []), optional=("t2d",))
    if reduced and weights["d2t"].dtype != torch.int64:
        raise ExportError(f"{out / MODEL_FILE}: d2t is {weights['d2t'].dtype}, expected int64")
    cfg = {**config, "aux_layer_ids": config["eagle_aux_hidden_state_layer_ids"]}
    _check_shapes(out / MODEL_FILE, weights, cfg)
    return config
