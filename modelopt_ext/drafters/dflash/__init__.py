"""DFlash as a drafter plugin: its recipe section (`dflash:`), layer rule, model, objective, format, proposer.

DFlash (z-lab, arXiv 2602.06036) drafts a whole block of B tokens in one forward: a few Qwen3-style layers
read the target's embeddings of [last verified token, MASK x (B-1)] and attend to features of several target
layers injected as extra keys/values ("KV injection"). Files: modeling.py (the model, top to bottom),
objective.py (anchored blocks, decayed cross-entropy), loading.py (checkpoint or export -> model),
proposer.py (specdec_bench), hf_format.py (export for vLLM/SGLang). This file imports no torch.

Layer ids: the project speaks vLLM's numbering everywhere (targets/layers.py). DFlash's own configs
(`dflash_config.target_layer_ids`, z-lab, vLLM's loader, SGLang) count decoder-layer OUTPUTS from 0, i.e.
DFlash id = vLLM id - 1; `to_dflash_ids`/`to_vllm_ids` are the only conversions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modelopt_ext.drafters.base import Built, Drafter
from modelopt_ext.drafters.dflash.serving import ARCHITECTURE


class DFlashSettings(BaseModel):
    """The DFlash drafter and its training (recipe section `dflash:`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    block_size: int = Field(
        default=16, ge=2, le=64,
        description="Tokens per block B (the anchor + B-1 drafts); vLLM num_speculative_tokens = B-1.",
    )  # fmt: skip
    num_layers: int = Field(default=5, ge=1, le=32, description="Draft decoder layers.")
    mask_token_id: int | None = Field(
        default=None,
        ge=0,
        description="Token id fed at the masked block positions. Default: the tokenizer's mask token if it "
        "has one, else the first embedding row past the tokenizer's vocabulary when the target pads its "
        "embeddings (Qwen3: 151669, what SpecForge and z-lab use), else vocab_size - 1. Must lie inside the "
        "target's vocabulary; exports write it explicitly.",
    )
    num_anchors: int = Field(
        default=512, ge=1, description="Blocks (anchors) sampled per sequence among supervised positions."
    )
    loss_gamma: float | None = Field(
        default=None,
        gt=0,
        description="Position decay: block position k (1..B-1) weighs exp(-(k-1)/gamma). Default "
        "`default_gamma(block_size)`: 7 for B=16, 4 for B=8 (the paper's values).",
    )
    distillation: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Weight of soft cross-entropy against the target's distribution; the hard cross-entropy "
        "on the data's tokens gets 1 - distillation.",
    )
    attention: Literal["sdpa"] = Field(
        default="sdpa",
        description="Training attention: SDPA with a boolean block mask, chunked over blocks "
        "(drafters/dflash/modeling.py says why).",
    )

    def gamma(self) -> float:
        """The loss decay actually used."""
        return self.loss_gamma if self.loss_gamma is not None else default_gamma(self.block_size)


def default_gamma(block_size: int) -> float:
    """The paper's decay for a block size: B/2 up to B=10 (4 for 8, 5 for 10, as Model-Optimizer suggests),
    then one more per 3 tokens (7 for 16, the paper's value; 9 for 22, ...). Only positions 1..B-1 are
    weighted, so for B=2 gamma does not matter."""
    if block_size <= 10:
        return block_size / 2
    return 5 + (block_size - 10) / 3


def default_layer_ids(num_layers: int, count: int) -> list[int]:
    """`count` target layers spread uniformly over DFlash ids 1..L-3 (z-lab's `build_target_layer_ids`,
    Model-Optimizer's and SpecForge's rule), returned in vLLM numbering (2..L-2). One layer: L//2 (DFlash id).
    Shallow targets repeat ids; repeats collapse, so they get fewer layers."""
    if num_layers < 2:
        raise ValueError(f"target has {num_layers} layers; DFlash needs at least 2")
    if count == 1:
        ids = [num_layers // 2]
    else:
        start = min(1, num_layers - 1)
        end = max(start, num_layers - 3)
        ids = [round(start + i * (end - start) / (count - 1)) for i in range(count)]
    return to_vllm_ids(sorted(set(ids)))


def to_vllm_ids(dflash_ids: list[int]) -> list[int]:
    """DFlash numbering (0-based layer outputs) -> vLLM numbering."""
    return [int(i) + 1 for i in dflash_ids]


def to_dflash_ids(vllm_ids: list[int]) -> list[int]:
    """vLLM numbering -> DFlash numbering (what dflash_config.target_layer_ids holds)."""
    return [int(i) - 1 for i in vllm_ids]


def check_mask_token_id(mask_token_id: int, vocab_size: int) -> None:
    """ValueError (one line naming `dflash.mask_token_id`) unless the id is a row of the embeddings."""
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"dflash.mask_token_id: {mask_token_id} is outside the target's vocabulary [0, {vocab_size})"
        )


def default_mask_token_id(vocab_size: int, tokenizer: Any = None) -> int:
    """The mask id when the recipe names none (see `DFlashSettings.mask_token_id`)."""
    if tokenizer is not None:
        mask = getattr(tokenizer, "mask_token_id", None)
        if isinstance(mask, int) and 0 <= mask < vocab_size:
            return mask
        used = len(tokenizer)
        if 0 < used < vocab_size:
            return used  # an embedding row no token uses (Qwen3: 151669, SpecForge's added <|MASK|>)
    return vocab_size - 1


class DFlash(Drafter):
    """DFlash: a block-diffusion drafter (Qwen3 layers with KV injection), one forward per block."""

    name = "dflash"
    section = "dflash"
    Settings = DFlashSettings
    summary = "DFlash block drafter (Qwen3 layers with target KV injection, one forward per block)"
    sglang_algorithms = ("DFLASH",)

    def default_layer_ids(self, num_layers: int, settings: BaseModel) -> list[int]:
        return default_layer_ids(num_layers, settings.num_layers)

    def check_target(self, settings: BaseModel, target_config: dict) -> list[str]:
        text = target_config.get("text_config") or target_config
        vocab = text.get("vocab_size")
        if settings.mask_token_id is None or not isinstance(vocab, int):
            return []
        try:
            check_mask_token_id(settings.mask_token_id, vocab)
        except ValueError as e:
            return [str(e)]
        return []

    def owns_config(self, config: dict) -> bool:
        if config.get("drafter") == self.name:
            return True
        if ARCHITECTURE in (config.get("architectures") or []):
            return True
        return isinstance(config.get("dflash_config"), dict)

    def layer_ids_of(self, config: dict) -> list[int]:
        ids = config.get("target_layer_ids")
        if ids is None and isinstance(config.get("dflash_config"), dict):
            ids = config["dflash_config"].get("target_layer_ids")
        if not ids:
            raise ValueError("drafter config has no target_layer_ids (top level or dflash_config)")
        return to_vllm_ids(ids)

    def default_num_steps(self, config: dict) -> int:
        from modelopt_ext.drafters.dflash import serving

        return serving.block_size_in(config) - 1

    def vllm_speculative_config(
        self, draft_path: str, num_speculative_tokens: int | None, folder: Path | None
    ) -> dict:
        from modelopt_ext.drafters.dflash import serving

        return serving.vllm_speculative_config(draft_path, num_speculative_tokens, folder)

    def sglang_args(
        self,
        draft_path: str,
        *,
        num_steps: int | None,
        topk: int | None,
        num_draft_tokens: int | None,
        folder: Path | None = None,
        algorithm: str | None = None,
    ) -> list[str]:
        from modelopt_ext.drafters.dflash import serving

        return serving.sglang_args(
            draft_path, num_steps=num_steps, topk=topk, num_draft_tokens=num_draft_tokens, folder=folder,
            algorithm=algorithm,
        )  # fmt: skip

    def serve_notes(self, folder: Path) -> list[str]:
        from modelopt_ext.drafters.dflash import serving

        return serving.serve_notes(folder)

    def build(
        self, settings, target_config, layer_ids, vocab, target_embeddings, *, target_head=None, tokenizer=None
    ) -> Built:
        from functools import partial

        from modelopt_ext.drafters.dflash.modeling import DFlashConfig, DFlashDraftModel
        from modelopt_ext.drafters.dflash.objective import dflash_loss
        from modelopt_ext.util.errors import ConfigError

        text = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        g = text.to_dict() if hasattr(text, "to_dict") else dict(text)
        vocab_size = int(g["vocab_size"])
        mask = settings.mask_token_id
        if mask is None:
            mask = default_mask_token_id(vocab_size, tokenizer)
        try:
            check_mask_token_id(int(mask), vocab_size)
        except ValueError as e:
            raise ConfigError([str(e)]) from None
        config = DFlashConfig.from_target_config(
            text, layer_ids, num_layers=settings.num_layers, block_size=settings.block_size, mask_token_id=mask
        )
        model = DFlashDraftModel(config)
        lm_head = getattr(target_head, "lm_head", None)
        if lm_head is None and target_embeddings is not None and g.get("tie_word_embeddings"):
            lm_head = target_embeddings
        if lm_head is None or target_embeddings is None:
            lm_head, target_embeddings = _read_target_tensors(target_config, lm_head, target_embeddings)
        model.set_target_tensors(target_embeddings, lm_head)
        loss = partial(
            dflash_loss,
            num_anchors=settings.num_anchors,
            gamma=settings.gamma(),
            distillation=settings.distillation,
        )
        return Built(
            model=model,
            config={"drafter": self.name, **config.to_dict()},
            loss_fn=loss,
            notes=[
                (
                    f"DFlash: {settings.num_layers} layers, block {settings.block_size}, mask token "
                    f"{config.mask_token_id}, {settings.num_anchors} anchors/sequence, gamma {settings.gamma():g}, "
                    f"distillation {settings.distillation:g}, attention {settings.attention}"
                )
            ],
        )

    def export(self, checkpoint_dir: Path, out_dir: Path, *, dtype: str | None, include_t2d: bool) -> Path:
        from modelopt_ext.drafters.dflash import hf_format

        return hf_format.export(checkpoint_dir, out_dir, dtype=dtype, include_t2d=include_t2d)

    def check_export(self, out_dir: Path) -> dict:
        from modelopt_ext.drafters.dflash import hf_format

        return hf_format.check_export(out_dir)

    def load(self, folder: Path, target_embeddings: Any = None) -> Any:
        from modelopt_ext.drafters.dflash.loading import load_drafter

        return load_drafter(folder, target_embeddings)

    def proposer(self, model: Any, target: Any) -> Any:
        from modelopt_ext.drafters.dflash.proposer import DFlashProposer

        return DFlashProposer(model, target)


def _read_target_tensors(target_config: Any, lm_head: Any, embeddings: Any) -> tuple[Any, Any]:
    """The target's lm_head / embeddings read from its folder (sources that ship neither, e.g. the remote
    target server, which sends embeddings but no lm_head); one config line when they cannot be read."""
    from modelopt_ext.targets.head import TargetHead
    from modelopt_ext.util.errors import ConfigError

    path = getattr(target_config, "name_or_path", None) or getattr(target_config, "_name_or_path", None)
    try:
        head = TargetHead.from_pretrained(path, with_embeddings=embeddings is None)
    except (OSError, KeyError, TypeError, ValueError) as e:
        missing = "lm_head" if lm_head is None else "embeddings"
        msg = (
            f"drafter: DFlash drafts with the target's lm_head and embeddings; this source ships no {missing} "
            f"and the target folder {path!r} gives none ({e})"
        )
        raise ConfigError([msg]) from None
    return (head.lm_head if lm_head is None else lm_head), (head.embed_tokens if embeddings is None else embeddings)


DFLASH = DFlash()
