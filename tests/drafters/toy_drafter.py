"""A toy drafter that lives only in tests: it proves the Drafter interface is the whole contract.

ToyDrafter is a single linear layer over the concatenated hidden states of its own target layers, predicting
ONE next token over the draft vocabulary. Recipes choose it with
`drafter: tests.drafters.toy_drafter:ToyDrafter` (importable from the repository root, which is where the
trainer and `accelerate launch` run). Nothing outside tests/ names it: if training it needed a change in
modelopt_ext/, EAGLE-3 would be leaking into generic code.

Its default layers ([0, L-2]: the embeddings and one middle layer) differ from EAGLE-3's rule on purpose, so
a test can tell whose rule the sources and servers applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from modelopt_ext.drafters.base import Built, Drafter

NAME = "tests.drafters.toy_drafter:ToyDrafter"
ARCHITECTURE = "ToyLinearDrafter"


class ToySettings(BaseModel):
    """Recipe section `toy:`."""

    model_config = ConfigDict(extra="forbid")

    draft_vocab_size: int = Field(default=128, gt=0)


def toy_layer_ids(num_layers: int) -> list[int]:
    """The embeddings (id 0) and layer L-2: not what EAGLE-3 would pick for any target."""
    if num_layers < 3:
        raise ValueError(f"target has {num_layers} layers; the toy drafter needs at least 3")
    return [0, num_layers - 2]


def _model(in_features: int, draft_vocab: int):
    import torch

    class ToyHead(torch.nn.Module):
        """features [.., n_aux * H] -> draft-vocab logits for the token after the next one's position."""

        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(in_features, draft_vocab)
            self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(1, dtype=torch.bool))

        def forward(self, features):
            return self.proj(features.float())

        def set_vocab(self, vocab) -> None:
            self.d2t = vocab.d2t.clone().long()
            self.t2d = vocab.t2d.clone().bool()

    return ToyHead()


def toy_loss(model: Any, sup: Any, vocab: Any, head: Any):
    """Soft cross-entropy of the head at t against the target's distribution at t (one drafted token)."""
    import torch

    from modelopt_ext.targets.head import resolve_target

    model = getattr(model, "module", model)
    probs, mask = resolve_target(sup, head, vocab)
    logits = model(sup.aux_hidden_states)[mask]
    target = probs[mask]
    n = mask.sum().clamp(min=1)
    loss = -(target * torch.log_softmax(logits, -1)).sum() / n
    with torch.no_grad():
        acc = (logits.argmax(-1) == target.argmax(-1)).sum().float() / n
    return loss, {
        "loss_0": loss.detach(),
        "acc_0": acc,
        "sim_accept_len": 1 + acc,
        "valid_positions": mask.sum().detach(),
    }


class ToyDrafter(Drafter):
    name = NAME
    section = "toy"
    Settings = ToySettings
    summary = "test-only linear head over concatenated target features"

    def default_layer_ids(self, num_layers: int, settings: BaseModel) -> list[int]:
        return toy_layer_ids(num_layers)

    def draft_vocab_size(self, settings: BaseModel, target_vocab_size: int) -> int:
        return min(settings.draft_vocab_size, target_vocab_size)

    def owns_config(self, config: dict) -> bool:
        return config.get("drafter") == NAME or config.get("architectures") == [ARCHITECTURE]

    def layer_ids_of(self, config: dict) -> list[int]:
        return [int(i) for i in config["aux_layer_ids"]]

    def vllm_speculative_config(self, draft_path: str, num_speculative_tokens: int, folder: Path | None) -> dict:
        raise NotImplementedError("the toy drafter has no vLLM format")

    def sglang_args(self, draft_path: str, **_: Any) -> list[str]:
        # No SGLang model exists for it; the flags only let tests see that the serve commands asked this drafter.
        return ["--speculative-algorithm", "TOY", "--speculative-draft-model-path", draft_path]

    def build(self, settings, target_config, layer_ids, vocab, target_embeddings, **_: Any) -> Built:
        text = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        hidden, draft_vocab = int(text.hidden_size), len(vocab.d2t)
        model = _model(len(layer_ids) * hidden, draft_vocab)
        model.set_vocab(vocab)
        config = {
            "drafter": NAME,
            "aux_layer_ids": list(layer_ids),
            "hidden_size": hidden,
            "draft_vocab_size": draft_vocab,
        }
        return Built(model=model, config=config, loss_fn=toy_loss, notes=[f"toy: linear head over layers {layer_ids}"])

    def export(self, checkpoint_dir: Path, out_dir: Path, *, dtype: str | None, include_t2d: bool) -> Path:
        from modelopt_ext.drafters.hf_folder import (
            CONFIG_FILE,
            MODEL_FILE,
            load_tensors,
            read_json,
            write_folder,
        )

        cfg = read_json(Path(checkpoint_dir) / CONFIG_FILE)
        weights = load_tensors(Path(checkpoint_dir) / MODEL_FILE)
        keep = {k: weights[k] for k in ("proj.weight", "proj.bias", "d2t")}
        config = {"architectures": [ARCHITECTURE], "drafter": NAME, **{k: cfg[k] for k in ("aux_layer_ids", "hidden_size", "draft_vocab_size")}}
        return write_folder(Path(out_dir), keep, config)

    def check_export(self, out_dir: Path) -> dict:
        from modelopt_ext.drafters.hf_folder import (
            CONFIG_FILE,
            MODEL_FILE,
            check_keys,
            load_tensors,
            read_json,
        )

        cfg = read_json(Path(out_dir) / CONFIG_FILE)
        check_keys(Path(out_dir) / MODEL_FILE, load_tensors(Path(out_dir) / MODEL_FILE),
                   ["proj.weight", "proj.bias", "d2t"])  # fmt: skip
        return cfg

    def load(self, folder: Path, target_embeddings: Any = None) -> Any:
        from modelopt_ext.drafters.hf_folder import CONFIG_FILE, MODEL_FILE, load_tensors, read_json

        cfg = read_json(Path(folder) / CONFIG_FILE)
        model = _model(len(cfg["aux_layer_ids"]) * cfg["hidden_size"], cfg["draft_vocab_size"])
        model.load_state_dict(load_tensors(Path(folder) / MODEL_FILE), strict=False)
        return model.eval()

    def proposer(self, model: Any, target: Any) -> Any:
        raise NotImplementedError("the toy drafter has no acceptance-benchmark proposer")
