"""Export a training checkpoint (`epoch_E_step_S/`) as an HF folder vLLM and SGLang load as is.

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

import json
from pathlib import Path
from typing import Any

import torch

from modelopt_ext.deploy import is_training_checkpoint
from modelopt_ext.util.fileio import read_json_object, replace_dir_atomically

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab_mapping.safetensors"
# vLLM loads every *.safetensors in the folder unless this index names the weight files; without it,
# vocab_mapping.safetensors is loaded as weights and a full-vocabulary drafter fails to load
# ("no module or parameter named 'draft_id_to_target_id'"). SGLang honours the same index.
INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURE = "LlamaForCausalLMEagle3"

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
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(Exception):
    """A checkpoint that cannot be exported; the message is one line naming the file."""


def _read_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise ExportError(str(e)) from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable safetensors ({e})") from None


def _check_keys(
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
    if not ckpt.is_dir():
        raise ExportError(f"{ckpt}: not a checkpoint folder")
    cfg = _read_json(ckpt / CONFIG_FILE)
    if not is_training_checkpoint(ckpt):
        arch = cfg.get("architectures")
        if arch == [ARCHITECTURE]:
            what = "an exported drafter (already what vLLM and SGLang load)"
        elif arch:
            what = f"a model folder ({', '.join(map(str, arch))})"
        else:
            what = "no trainer_state.json and no aux_layer_ids in config.json"
        raise ExportError(
            f"{ckpt}: {what}, not a training checkpoint "
            "(export takes an epoch_E_step_S/ folder the trainer wrote under training.output_dir)"
        )
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
    state = _load_tensors(ckpt / MODEL_FILE)
    _check_keys(ckpt / MODEL_FILE, state, CHECKPOINT_KEYS)
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


def export_checkpoint(
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
    from safetensors.torch import save_file

    ckpt, out = Path(ckpt_dir), Path(out_dir)
    state, cfg, vocab = load_checkpoint_for_export(ckpt)
    if dtype is not None and dtype not in _DTYPES:
        raise ExportError(f"dtype {dtype!r} not one of {sorted(_DTYPES)}")
    weights: dict[str, torch.Tensor] = {}
    for k in EXPORT_KEYS:
        w = state[k]
        weights[k] = (w.to(_DTYPES[dtype]) if dtype else w).contiguous()
    # vLLM allocates draft_id_to_target_id only for a reduced vocabulary and rejects a d2t otherwise.
    if not vocab.is_identity:
        weights["d2t"] = vocab.d2t.to(torch.int64).contiguous()
    if include_t2d:
        weights["t2d"] = vocab.t2d.to(torch.bool).contiguous()
    torch_dtype = dtype or str(state["fc.weight"].dtype).removeprefix("torch.")
    config = hf_config(cfg, torch_dtype=torch_dtype, target_model=cfg.get("target_model"))

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
        vocab.save(tmp)
    return out


def check_export(out_dir: str | Path) -> dict:
    """Strictly check an exported folder (keys, dtypes, config); returns its config. Raises ExportError."""
    out = Path(out_dir)
    config = _read_json(out / CONFIG_FILE)
    if config.get("architectures") != [ARCHITECTURE]:
        raise ExportError(
            f"{out / CONFIG_FILE}: architectures is {config.get('architectures')}, expected [{ARCHITECTURE!r}]"
        )
    weights = _load_tensors(out / MODEL_FILE)
    index = _read_json(out / INDEX_FILE)
    if set(index.get("weight_map", {}).values()) != {MODEL_FILE} or set(index["weight_map"]) != set(weights):
        raise ExportError(f"{out / INDEX_FILE}: weight_map must list exactly the tensors of {MODEL_FILE}")
    reduced = int(config["draft_vocab_size"]) < int(config["vocab_size"])
    _check_keys(out / MODEL_FILE, weights, EXPORT_KEYS + (["d2t"] if reduced else []), optional=("t2d",))
    if reduced and weights["d2t"].dtype != torch.int64:
        raise ExportError(f"{out / MODEL_FILE}: d2t is {weights['d2t'].dtype}, expected int64")
    cfg = {**config, "aux_layer_ids": config["eagle_aux_hidden_state_layer_ids"]}
    _check_shapes(out / MODEL_FILE, weights, cfg)
    return config
