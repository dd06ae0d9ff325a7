"""EAGLE-3 as a drafter plugin: its recipe section (`eagle:`), layer rule, model, objective, format, proposer.

Files: modeling.py (the head, top to bottom), ttt_attention.py (training-time-test attention), objective.py
(the loss), hf_format.py (export for vLLM/SGLang), loading.py (checkpoint or export -> model),
proposer.py (specdec_bench). This file imports no torch (the launcher validates recipes with it).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modelopt_ext.drafters.base import Built, Drafter
from modelopt_ext.drafters.eagle3.identity import (
    ARCHITECTURE,
    default_aux_layer_ids,
    parallel_drafting_reason,
)

DEFAULT_NUM_STEPS = 3  # draft tokens per round when the serve command or benchmark names none


class Eagle3Settings(BaseModel):
    """The EAGLE-3 draft head and its training-time test (recipe section `eagle:`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    ttt_steps: int = Field(default=7, ge=1, le=16, description="Training-time-test unroll length.")
    draft_vocab_size: int = Field(default=32000, gt=0)
    step_loss_decay: float = Field(default=0.8, gt=0, le=1)
    freeze_embeddings: bool = True
    attention: Literal["auto", "fused", "chunked", "dense"] = Field(
        default="auto",
        description="TTT attention backend (drafters/eagle3/ttt_attention.py): auto = fused flash kernels where they "
        "apply, else query chunks; dense = the quadratic reference.",
    )


class Eagle3(Drafter):
    """EAGLE-3: one decoder layer over fused low/mid/high target features, trained with training-time test."""

    name = "eagle3"
    section = "eagle"
    Settings = Eagle3Settings
    summary = "EAGLE-3 draft head (one Llama decoder layer over three target layers)"
    sglang_algorithms = ("EAGLE3", "EAGLE")  # EAGLE: SGLang runs the head the EAGLE-2 way

    def default_layer_ids(self, num_layers: int, settings: BaseModel) -> list[int]:
        return default_aux_layer_ids(num_layers)

    def draft_vocab_size(self, settings: BaseModel, target_vocab_size: int) -> int:
        return min(settings.draft_vocab_size, target_vocab_size)

    def owns_config(self, config: dict) -> bool:
        # Our exports; exports of other EAGLE-3 trainers (other architectures, same eagle fields); our
        # checkpoints from before they named their drafter.
        if config.get("architectures") == [ARCHITECTURE]:
            return True
        if "eagle_aux_hidden_state_layer_ids" in config or isinstance(config.get("eagle_config"), dict):
            return True
        return "architectures" not in config and "aux_layer_ids" in config and "drafter" not in config

    def layer_ids_of(self, config: dict) -> list[int]:
        ids = config.get("aux_layer_ids") or config.get("eagle_aux_hidden_state_layer_ids")
        if not ids and isinstance(config.get("eagle_config"), dict):
            ids = config["eagle_config"].get("eagle_aux_hidden_state_layer_ids")
        if not ids:
            raise ValueError("drafter config has no aux layer ids (aux_layer_ids / eagle_aux_hidden_state_layer_ids)")
        return [int(i) for i in ids]

    def vllm_speculative_config(
        self, draft_path: str, num_speculative_tokens: int | None, folder: Path | None
    ) -> dict:
        k = num_speculative_tokens or DEFAULT_NUM_STEPS
        cfg: dict = {"method": "eagle3", "model": draft_path, "num_speculative_tokens": k}
        if folder is not None and self._parallel_reason(folder):
            cfg["parallel_drafting"] = True
        return cfg

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
        steps, topk = num_steps or DEFAULT_NUM_STEPS, topk or 1
        # A chain (topk 1) verifies the root plus one token per step; SGLang rejects anything else.
        draft_tokens = num_draft_tokens or steps + 1
        if topk == 1 and draft_tokens != steps + 1:
            raise ValueError(
                f"--num-draft-tokens must be --num-steps + 1 = {steps + 1} when --topk is 1 (a chain); got {draft_tokens}"
            )
        return [
            "--speculative-algorithm", algorithm or self.sglang_algorithms[0],
            "--speculative-draft-model-path", draft_path,
            "--speculative-num-steps", str(steps),
            "--speculative-eagle-topk", str(topk),
            "--speculative-num-draft-tokens", str(draft_tokens),
        ]  # fmt: skip

    def sglang_folder(self, folder: Path, *, exported: bool, options: dict[str, str]):
        from modelopt_ext.drafters.eagle3.sglang_folder import sglang_folder

        return sglang_folder(folder, exported=exported, options=options, architecture=ARCHITECTURE)

    def serve_notes(self, folder: Path) -> list[str]:
        from modelopt_ext.drafters.hf_folder import read_json

        cfg = read_json(folder / "config.json")
        notes = []
        if "eagle_aux_hidden_state_layer_ids" not in cfg:
            nested = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
            notes.append(
                f"{folder}/config.json has no top-level eagle_aux_hidden_state_layer_ids; vLLM will use "
                + (f"the nested {nested} verbatim" if nested else "its default layers")
                + " (vLLM numbering; re-export with python -m modelopt_ext.export to pin them)"
            )
        if self._parallel_reason(folder):
            notes.append("parallel-drafting (P-EAGLE) head: enabling parallel_drafting")
        return notes

    @staticmethod
    def _parallel_reason(folder: Path) -> str | None:
        from modelopt_ext.drafters.hf_folder import read_json, weight_keys

        return parallel_drafting_reason(read_json(folder / "config.json"), weight_keys(folder))

    def build(
        self, settings, target_config, layer_ids, vocab, target_embeddings, *, target_head=None, tokenizer=None
    ) -> Built:
        from modelopt_ext.drafters.eagle3.modeling import Eagle3Config, Eagle3DraftModel
        from modelopt_ext.drafters.eagle3.objective import eagle3_loss

        config = Eagle3Config.from_target_config(
            target_config, aux_layer_ids=layer_ids, draft_vocab_size=len(vocab.d2t)
        )
        model = Eagle3DraftModel(config)
        model.attention_impl = settings.attention
        model.set_vocab(vocab)
        if target_embeddings is not None:
            model.load_embeddings(target_embeddings, freeze=settings.freeze_embeddings)
        else:
            model.embed_tokens.weight.requires_grad_(not settings.freeze_embeddings)
        loss = partial(eagle3_loss, ttt_steps=settings.ttt_steps, step_decay=settings.step_loss_decay)
        return Built(
            model=model,
            config={"drafter": self.name, **config.to_dict()},
            loss_fn=loss,
            notes=[f"EAGLE-3: ttt steps {settings.ttt_steps}, attention {settings.attention}"],
        )

    def export(self, checkpoint_dir: Path, out_dir: Path, *, dtype: str | None, include_t2d: bool) -> Path:
        from modelopt_ext.drafters.eagle3 import hf_format

        return hf_format.export(checkpoint_dir, out_dir, dtype=dtype, include_t2d=include_t2d)

    def check_export(self, out_dir: Path) -> dict:
        from modelopt_ext.drafters.eagle3 import hf_format

        return hf_format.check_export(out_dir)

    def load(self, folder: Path, target_embeddings: Any = None) -> Any:
        from modelopt_ext.drafters.eagle3.loading import load_drafter

        return load_drafter(folder, target_embeddings)

    def proposer(self, model: Any, target: Any) -> Any:
        from modelopt_ext.drafters.eagle3.proposer import Eagle3Proposer

        return Eagle3Proposer(model)


EAGLE3 = Eagle3()
