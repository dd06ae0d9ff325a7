"""The colocated source: the target runs in the trainer process and yields `Supervision`.

This is exactly the code the remote target server runs (supply/target_server/handler.py): a pure,
deterministic function of the target's weights and the batch, under no_grad. Aux states use vLLM's layer
numbering (modelopt_ext/targets/layers.py): id k < L is HF `hidden_states[k]` (the residual stream after k decoder layers, 0 = embeddings);
id L is the last decoder layer's output BEFORE the final norm. HF's `hidden_states[L]` is after the norm,
so id L is captured with a forward pre-hook on the final norm instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelopt_ext.targets.layers import check_layer_ids, target_num_layers
from modelopt_ext.targets.supervision import Supervision
from modelopt_ext.telemetry.meter import IN_PROCESS


def num_target_layers(model: nn.Module) -> int:
    """Decoder layers of a loaded target (targets/layers.py reads the config)."""
    return target_num_layers(model.config)


def forward_with_aux(
    model: nn.Module, aux_layer_ids: list[int], **model_kwargs: Any
) -> tuple[Any, torch.Tensor]:
    """Run a transformers causal LM and return (its output, aux states [B, q, n_aux*H] in vLLM numbering).

    Works with a KV cache too (`past_key_values=...`): the states are those of the tokens fed in this call.
    """
    num_layers = num_target_layers(model)
    captured: dict[str, torch.Tensor] = {}
    hook = None
    if num_layers in aux_layer_ids:

        def grab(_module, args):
            captured["pre_norm"] = args[0]

        hook = model.get_decoder().norm.register_forward_pre_hook(grab)
    try:
        out = model(**model_kwargs, output_hidden_states=True)
    finally:
        if hook is not None:
            hook.remove()
    states = [captured["pre_norm"] if k == num_layers else out.hidden_states[k] for k in aux_layer_ids]
    return out, torch.cat(states, dim=-1)


class ColocatedSource:
    """Callable on a collated batch {input_ids, attention_mask, loss_mask} -> Supervision (target_logits)."""

    telemetry_kind = IN_PROCESS  # the target's forward runs here: supply time

    def __init__(self, target_model: nn.Module, aux_layer_ids: list[int]):
        self.model = target_model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.num_layers = num_target_layers(target_model)
        # Any layer 0..L can be captured (id L = pre-final-norm output: dumps and servers ship it).
        self.aux_layer_ids = check_layer_ids(self.num_layers, aux_layer_ids)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> Supervision:
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device).bool()
        loss_mask = batch["loss_mask"].to(self.device).bool()
        out, aux = forward_with_aux(
            self.model,
            self.aux_layer_ids,
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            use_cache=False,
        )
        return Supervision(
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            aux_hidden_states=aux,
            target_logits=out.logits,
        )

    @classmethod
    def from_recipe(cls, recipe: Any, device: str | torch.device = "cpu") -> ColocatedSource:
        """Load the recipe's target (`model.path`, `model.dtype`) on `device` with its aux layer ids (the
        recipe's, or the default rule)."""
        from transformers import AutoModelForCausalLM

        from modelopt_ext.drafters.layers import recipe_layer_ids

        dtype = getattr(torch, recipe.model.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            recipe.model.path, dtype=dtype, trust_remote_code=recipe.model.trust_remote_code
        ).to(device)
        ids = recipe_layer_ids(recipe, num_target_layers(model))
        return cls(model, ids)
