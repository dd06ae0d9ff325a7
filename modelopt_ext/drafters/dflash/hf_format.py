"""DFlash's serialized format: a training checkpoint -> the folder vLLM and SGLang load, and strict checks of it.

What the engines read (vLLM 0.32 `model_executor/models/qwen3_dflash.py` + `v1/spec_decode/dflash.py` +
`config/speculative.py`; SGLang `srt/models/dflash.py` + `srt/speculative/dflash_utils.py`), and what they do
when a field is missing: they fall back SILENTLY, so the export writes every one of them (docs/dflash.md):
- `architectures: ["DFlashDraftModel"]` (vLLM's registry; SGLang's EntryClass), `model_type: "qwen3"`;
- the draft's Qwen3 fields. `head_dim` (Qwen3Config defaults it to 128), `rope_theta` (vLLM's DFlash layer
  defaults it to 1e6, the target's is often 1e4; DFlash injects the target's features into every layer's
  K/V, so the draft's RoPE must be the one it was trained with) also as `rope_parameters` (transformers 5),
  `num_key_value_heads`, `rms_norm_eps`, `max_position_embeddings`, `attention_bias`, `is_neox_style`;
- `block_size` B: top level (z-lab, Model-Optimizer) AND `dflash_config.block_size` (SGLang reads the nested
  one first, default 16). vLLM never reads it: it drafts `num_speculative_tokens` masks, so the serve helpers
  pass B - 1 (`serving.py`);
- `dflash_config.mask_token_id` (vLLM's proposer raises without it; SGLang resolves "<|MASK|>" in the
  tokenizer, or ADDS it, when it is absent);
- `dflash_config.target_layer_ids`: in DFlash's numbering, the index of the target decoder layer whose OUTPUT
  is read (= this project's vLLM-numbered id - 1; vLLM adds the 1 back, SGLang captures after layer i). Our
  checkpoints already hold them in that numbering (drafters/dflash/modeling.py). Missing, both engines pick
  their own layers;
- `num_target_layers` (top level and nested): SGLang range-checks the ids against it and, without it, against
  the DRAFT's layer count;
- `dflash_config.causal: false` and `layer_types: full_attention x N`: attention inside a block is
  bidirectional (vLLM resolves causality from `is_causal`, then `dflash_config.causal`, then `layer_types`;
  SGLang from `layer_types`). `use_aux_hidden_state: true` (vLLM would drop `fc` otherwise);
- `target_hidden_size` (vLLM sizes `fc` from it) equal to `hidden_size` (SGLang sizes `fc` from
  `hidden_size`, and the draft consumes the target's embeddings, so they must agree);
- `vocab_size` = `draft_vocab_size` = the target's: DFlash predicts over the full vocabulary with the
  target's lm_head; a smaller `draft_vocab_size` makes vLLM expect a `d2t` tensor.
Weights (`model.safetensors`, plus the index that names it): `fc`, `hidden_norm`, `norm` and per layer
`self_attn.{q,k,v,o}_proj`, `self_attn.{q,k}_norm`, `mlp.{gate,up,down}_proj`, `input_layernorm`,
`post_attention_layernorm` -- vLLM's and SGLang's names (both fuse q/k/v and gate/up themselves). No
`embed_tokens`/`lm_head`: both engines use the target's (vLLM shares them when the weights have none; SGLang's
model has no such parameters). No `mask_embedding.pt` (vLLM would replace the mask token's embedding with it).
The folder appears atomically (temp dir + rename) or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from modelopt_ext.drafters.dflash.serving import ARCHITECTURE, DFLASH_CONFIG_FIELDS, EXPORT_FIELDS
from modelopt_ext.drafters.hf_folder import (
    CONFIG_FILE,
    MODEL_FILE,
    ExportError,
    check_keys,
    load_tensors,
    read_folder,
    read_json,
    torch_dtype,
    write_folder,
)
from modelopt_ext.drafters.rope import rope_from_dict

MODEL_TYPE = "qwen3"

_LAYER_PARTS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
# Tensors a training checkpoint may hold that the export leaves out (the engines use the target's).
TARGET_SHARED_KEYS = ("embed_tokens.weight", "lm_head.weight")

# Fields of our training checkpoint's config.json the export needs (drafters/dflash/modeling.py writes them).
CHECKPOINT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "block_size",
    "mask_token_id",
    "target_layer_ids",
    "target_hidden_size",
    "num_target_layers",
)


def layer_keys(num_layers: int) -> list[str]:
    """Weight names of the draft's decoder layers, as vLLM and SGLang name them."""
    return [f"layers.{i}.{part}" for i in range(num_layers) for part in _LAYER_PARTS]


def export_keys(num_layers: int) -> list[str]:
    """Exactly the tensors of an export with `num_layers` draft layers."""
    return ["fc.weight", "hidden_norm.weight", *layer_keys(num_layers), "norm.weight"]


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of the exported weights for a config (checkpoint or export form)."""
    h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    nh, hd = int(cfg["num_attention_heads"]), int(cfg["head_dim"])
    nkv = int(cfg["num_key_value_heads"])
    th = int(cfg["target_hidden_size"])
    ids = cfg["target_layer_ids"] if "target_layer_ids" in cfg else cfg["dflash_config"]["target_layer_ids"]
    per_layer = {
        "self_attn.q_proj.weight": (nh * hd, h),
        "self_attn.k_proj.weight": (nkv * hd, h),
        "self_attn.v_proj.weight": (nkv * hd, h),
        "self_attn.o_proj.weight": (h, nh * hd),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    shapes = {"fc.weight": (h, len(ids) * th), "hidden_norm.weight": (h,), "norm.weight": (h,)}
    for i in range(int(cfg["num_hidden_layers"])):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    shapes["embed_tokens.weight"] = (int(cfg["vocab_size"]), h)
    shapes["lm_head.weight"] = (int(cfg["vocab_size"]), h)
    return shapes


def _check_shapes(path: Path, tensors: dict[str, torch.Tensor], cfg: dict) -> None:
    bad = [
        f"{k} {tuple(tensors[k].shape)} != {shape}"
        for k, shape in expected_shapes(cfg).items()
        if k in tensors and tuple(tensors[k].shape) != shape
    ]
    if bad:
        raise ExportError(f"{path}: shapes do not match config.json: {'; '.join(bad)}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def hf_config(cfg: dict, *, torch_dtype: str) -> dict:
    """The exported `config.json` for a training checkpoint's config (see the module docstring)."""
    n = int(cfg["num_hidden_layers"])
    theta, scaling = rope_from_dict(cfg)
    block, num_target = int(cfg["block_size"]), int(cfg["num_target_layers"])
    causal = bool(cfg.get("causal", False))
    out = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "hidden_size": int(cfg["hidden_size"]),
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_hidden_layers": n,
        "num_attention_heads": int(cfg["num_attention_heads"]),
        "num_key_value_heads": int(cfg["num_key_value_heads"]),
        "head_dim": int(cfg["head_dim"]),
        "hidden_act": cfg.get("hidden_act", "silu"),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": theta},
        "rope_scaling": scaling,
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 4096)),
        "vocab_size": int(cfg["vocab_size"]),
        "draft_vocab_size": int(cfg["vocab_size"]),
        "attention_bias": bool(cfg.get("attention_bias", False)),
        "attention_dropout": 0.0,
        "is_neox_style": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "layer_types": ["full_attention"] * n,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "block_size": block,
        "num_target_layers": num_target,
        "target_hidden_size": int(cfg["target_hidden_size"]),
        "dflash_config": {
            "block_size": block,
            "mask_token_id": int(cfg["mask_token_id"]),
            "target_layer_ids": [int(i) for i in cfg["target_layer_ids"]],
            "num_target_layers": num_target,
            "causal": causal,
            "use_aux_hidden_state": True,
        },
    }
    if cfg.get("target_model"):
        out["target_model"] = cfg["target_model"]
    return out


def checkpoint_config_of_export(config: dict) -> dict:
    """The training-checkpoint form of an export's config (what `hf_config` was made from; for loaders)."""
    d = config["dflash_config"]
    out = {
        k: config[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "hidden_act",
            "rms_norm_eps",
            "max_position_embeddings",
            "vocab_size",
            "attention_bias",
            "target_hidden_size",
            "num_target_layers",
        )
        if k in config
    }
    theta, scaling = rope_from_dict(config)
    out.update(
        drafter="dflash",
        rope_theta=theta,
        rope_scaling=scaling,
        block_size=int(d["block_size"]),
        mask_token_id=int(d["mask_token_id"]),
        target_layer_ids=[int(i) for i in d["target_layer_ids"]],
        causal=bool(d.get("causal", False)),
    )
    return out


def load_checkpoint_for_export(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and strictly check a training checkpoint: (its draft tensors, its config)."""
    ckpt = Path(ckpt_dir)
    cfg = read_json(ckpt / CONFIG_FILE)
    missing = [k for k in CHECKPOINT_FIELDS if k not in cfg]
    if "rope_theta" not in cfg and not isinstance(cfg.get("rope_parameters"), dict):
        missing.append("rope_theta")  # never a default: the engines' (1e6) is rarely the target's
    if missing:
        raise ExportError(f"{ckpt / CONFIG_FILE}: missing fields {missing}")
    num_target = cfg["num_target_layers"]
    if not _int(num_target) or num_target < 1:
        raise ExportError(f"{ckpt / CONFIG_FILE}: num_target_layers {num_target!r} must be an integer >= 1")
    _check_values(ckpt / CONFIG_FILE, cfg, cfg["target_layer_ids"], num_target)
    state = load_tensors(ckpt / MODEL_FILE)
    check_keys(
        ckpt / MODEL_FILE, state, export_keys(int(cfg["num_hidden_layers"])), optional=TARGET_SHARED_KEYS
    )
    _check_shapes(ckpt / MODEL_FILE, state, cfg)
    return state, cfg


def _check_values(where: Path, cfg: dict, ids: Any, num_target_layers: int) -> None:
    """Block size, mask id, layer ids and sizes that make sense together (one line naming the field)."""
    vocab = cfg.get("vocab_size")
    problems = []
    block = cfg.get("block_size")
    if not _int(block) or block < 2:
        problems.append(f"block_size {block!r} must be an integer >= 2")
    mask = cfg.get("mask_token_id")
    if not _int(mask) or not _int(vocab) or not 0 <= mask < vocab:
        problems.append(f"mask_token_id {mask!r} must be an integer in [0, vocab_size={vocab!r})")
    if (
        not isinstance(ids, list)
        or not ids
        or not all(_int(i) and 0 <= i < num_target_layers for i in ids)
        or len(set(ids)) != len(ids)
    ):
        problems.append(
            f"target_layer_ids {ids!r} must be distinct integers in [0, num_target_layers={num_target_layers}) "
            "(DFlash numbering: the output of target decoder layer i)"
        )
    if cfg.get("target_hidden_size") != cfg.get("hidden_size"):
        problems.append(
            f"target_hidden_size {cfg.get('target_hidden_size')!r} != hidden_size {cfg.get('hidden_size')!r} "
            "(the draft consumes the target's embeddings; SGLang sizes fc from hidden_size)"
        )
    if problems:
        raise ExportError(f"{where}: {'; '.join(problems)}")


def export(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    include_t2d: bool = False,
    overwrite: bool = True,
) -> Path:
    """Export `ckpt_dir` (a DFlash training checkpoint) to `out_dir` (atomic). Returns `out_dir`.

    `dtype` casts the floating weights (default: as trained). `include_t2d` has nothing to add: DFlash drafts
    over the target's whole vocabulary (no draft-vocabulary mapping).
    """
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    state, cfg = load_checkpoint_for_export(ckpt)
    cast = torch_dtype(dtype) if dtype is not None else None
    keys = export_keys(int(cfg["num_hidden_layers"]))
    weights = {k: (state[k].to(cast) if cast is not None else state[k]).contiguous() for k in keys}
    dtype_name = dtype or str(state["fc.weight"].dtype).removeprefix("torch.")
    config = hf_config(cfg, torch_dtype=dtype_name)
    written = write_folder(out, weights, config, overwrite=overwrite)
    check_export(written)  # what we wrote is what we promise (the same strict check serve and bench run)
    return written


def check_export(out_dir: str | Path) -> dict:
    """Strictly check an exported folder (config fields, keys, shapes); returns its config. Raises ExportError."""
    out = Path(out_dir)
    where = out / CONFIG_FILE
    config = read_json(where)
    if config.get("architectures") != [ARCHITECTURE]:
        raise ExportError(
            f"{where}: architectures is {config.get('architectures')}, expected [{ARCHITECTURE!r}]"
        )
    missing = [k for k in EXPORT_FIELDS if k not in config]
    if missing:
        raise ExportError(f"{where}: missing fields {missing} (vLLM/SGLang would silently use defaults)")
    d = config["dflash_config"]
    if not isinstance(d, dict):
        raise ExportError(f"{where}: dflash_config must be an object")
    missing = [k for k in DFLASH_CONFIG_FIELDS if k not in d]
    if missing:
        raise ExportError(
            f"{where}: dflash_config is missing {missing} (vLLM/SGLang would silently use defaults)"
        )
    n, num_target = config["num_hidden_layers"], config["num_target_layers"]
    problems = []
    if config["model_type"] != MODEL_TYPE:
        problems.append(f"model_type {config['model_type']!r} != {MODEL_TYPE!r}")
    for k in ("block_size", "num_target_layers"):
        if d[k] != config[k]:
            problems.append(f"dflash_config.{k} {d[k]!r} != {k} {config[k]!r}")
    if not _int(n) or n < 1:
        problems.append(f"num_hidden_layers {n!r} must be an integer >= 1")
    elif config["layer_types"] != ["full_attention"] * n:
        problems.append(f"layer_types must be ['full_attention'] x {n} (got {config['layer_types']!r})")
    if config["draft_vocab_size"] != config["vocab_size"]:
        problems.append("draft_vocab_size must equal vocab_size (DFlash drafts over the target's vocabulary)")
    if d["use_aux_hidden_state"] is not True:
        problems.append("dflash_config.use_aux_hidden_state must be true (vLLM drops fc otherwise)")
    if not isinstance(d["causal"], bool) or config.get("is_causal") not in (None, d["causal"]):
        problems.append("dflash_config.causal must be a boolean (and agree with is_causal, if present)")
    rope = config["rope_parameters"]
    if not isinstance(rope, dict) or rope.get("rope_theta") != config["rope_theta"]:
        problems.append(f"rope_parameters.rope_theta must equal rope_theta {config['rope_theta']!r}")
    if problems:
        raise ExportError(f"{where}: {'; '.join(problems)}")
    if not _int(num_target) or num_target < 1:
        raise ExportError(f"{where}: num_target_layers {num_target!r} must be an integer >= 1")
    _check_values(where, {**config, "mask_token_id": d["mask_token_id"]}, d["target_layer_ids"], num_target)
    config, weights = read_folder(out)
    check_keys(out / MODEL_FILE, weights, export_keys(n))
    _check_shapes(out / MODEL_FILE, weights, config)
    return config
