"""The engine flags that load a DFlash drafter, with the block size read from its config (no torch).

A DFlash drafter is trained for one block size B (the anchor + B-1 masks, attending to each other both ways),
so the engines must draft exactly that block: vLLM `{"method": "dflash", "num_speculative_tokens": B-1}`
(vLLM counts the masks; `v1/spec_decode/dflash.py` queries 1 + k tokens), SGLang `--speculative-algorithm
DFLASH --speculative-num-draft-tokens B` (SGLang counts the block; it prefers this flag over the config's
block_size and only warns on a mismatch). A request for another length is refused (one line) rather than
run: the engines would draft a block the model never saw, silently worse. B is read from the folder's
config.json: an export (`dflash_config.block_size`, also at the top level) or our training checkpoint
(`block_size`). A hub id has no local config: the caller must say the length.
"""

from __future__ import annotations

from pathlib import Path

from modelopt_ext.drafters.hf_folder import read_json

ARCHITECTURE = "DFlashDraftModel"  # what exports declare (vLLM's registry name for its DFlash model)

# Top-level fields every export states (read by vLLM or SGLang, with a silent default when absent).
EXPORT_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "max_position_embeddings",
    "vocab_size",
    "draft_vocab_size",
    "attention_bias",
    "is_neox_style",
    "layer_types",
    "block_size",
    "num_target_layers",
    "target_hidden_size",
    "dflash_config",
)
# Fields of `dflash_config` every export states.
DFLASH_CONFIG_FIELDS = (
    "block_size",
    "mask_token_id",
    "target_layer_ids",
    "num_target_layers",
    "causal",
    "use_aux_hidden_state",
)


def block_size_in(cfg: dict, where: str = "config.json") -> int:
    """B from a config dict (export: `dflash_config.block_size` and the top level; checkpoint: `block_size`).

    ValueError (naming `where`) when it states none, or two different ones.
    """
    nested = cfg.get("dflash_config") if isinstance(cfg.get("dflash_config"), dict) else {}
    found = {v for v in (cfg.get("block_size"), nested.get("block_size")) if v is not None}
    if len(found) > 1:
        raise ValueError(
            f"{where}: block_size {cfg.get('block_size')} != dflash_config.block_size {nested['block_size']}"
        )
    b = found.pop() if found else None
    if not isinstance(b, int) or isinstance(b, bool) or b < 2:
        raise ValueError(
            f"{where}: no usable block_size (got {b!r}); re-export it with python -m modelopt_ext.export"
        )
    return b


def block_size_of(folder: Path | None) -> int | None:
    """B from a drafter folder's config.json (export or checkpoint); None without a local config.

    ValueError (naming the file) when it states none, or two different ones.
    """
    if folder is None or not (Path(folder) / "config.json").is_file():
        return None
    where = Path(folder) / "config.json"
    return block_size_in(read_json(where), str(where))


def vllm_speculative_config(draft_path: str, num_speculative_tokens: int | None, folder: Path | None) -> dict:
    """vLLM's `--speculative-config` for a DFlash drafter: B-1 drafts per round (see the module docstring)."""
    block = block_size_of(folder)
    if block is None:
        if num_speculative_tokens is None:
            raise ValueError(
                f"{draft_path}: a DFlash drafter without a local config: pass --num-speculative-tokens "
                "(its block size - 1)"
            )
        n = num_speculative_tokens
    else:
        n = block - 1
        if num_speculative_tokens not in (None, n):
            raise ValueError(
                f"{draft_path}: a DFlash drafter with block size {block} drafts {n} tokens per round; "
                f"--num-speculative-tokens {num_speculative_tokens} would run a block it was not trained on"
            )
    return {"method": "dflash", "model": draft_path, "num_speculative_tokens": n}


def sglang_args(
    draft_path: str,
    *,
    num_steps: int | None,
    topk: int | None,
    num_draft_tokens: int | None,
    folder: Path | None,
    algorithm: str | None,
) -> list[str]:
    """SGLang's flags for a DFlash drafter: the whole block B as its draft tokens."""
    if num_steps is not None or topk is not None:
        raise ValueError(
            "a DFlash drafter drafts one block per forward: --num-steps and --topk do not apply "
            "(--num-draft-tokens is its block size)"
        )
    block = block_size_of(folder)
    if block is None:
        if num_draft_tokens is None:
            raise ValueError(
                f"{draft_path}: a DFlash drafter without a local config: pass --num-draft-tokens (its block size)"
            )
        block = num_draft_tokens
    elif num_draft_tokens not in (None, block):
        raise ValueError(
            f"{draft_path}: a DFlash drafter with block size {block} takes --num-draft-tokens {block}; "
            f"{num_draft_tokens} would run a block it was not trained on"
        )
    return [
        "--speculative-algorithm", algorithm or "DFLASH",
        "--speculative-draft-model-path", draft_path,
        "--speculative-num-draft-tokens", str(block),
    ]  # fmt: skip


def serve_notes(folder: Path) -> list[str]:
    """Fields a local export leaves to the engines' silent defaults (another tool's export, e.g. z-lab's)."""
    cfg = read_json(Path(folder) / "config.json")
    nested = cfg.get("dflash_config") if isinstance(cfg.get("dflash_config"), dict) else {}
    missing = [k for k in EXPORT_FIELDS if k not in cfg] + [
        f"dflash_config.{k}" for k in DFLASH_CONFIG_FIELDS if k not in nested
    ]
    if not missing:
        return []
    note = (
        f"{folder}/config.json does not state {', '.join(missing)}: vLLM/SGLang will use their defaults there "
        "(re-export a checkpoint of ours with python -m modelopt_ext.export to pin them)"
    )
    return [note]
