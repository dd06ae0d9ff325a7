"""specdec_bench's proposer for DFlash: one forward per block over the cached target context.

After prefill the context is the prompt's target states (positions 0..n-1) and the anchor is the target's
first token x_n at position n (the target has not read it). Each round drafts the whole block in one
forward and proposes its first k tokens (k <= block_size - 1); after verification the states of the
verified positions (x_n and the accepted drafts) join the context and the target's own token becomes the
next anchor. The decoding loop (acceptance/specdec.py) verifies greedily, so the output is the target's.
"""

from __future__ import annotations

import torch

from modelopt_ext.drafters.dflash.modeling import DFlashDraftModel


class DFlashProposer:
    """Block drafting with a DFlash model, the target's embeddings and lm_head installed from `target`."""

    def __init__(self, draft: DFlashDraftModel, target=None):
        self.draft = draft.eval()
        if target is not None:
            emb = target.get_input_embeddings().weight
            head = target.get_output_embeddings().weight
            dtype = next(draft.parameters()).dtype
            self.draft.set_target_tensors(emb.to(dtype), head.to(dtype))
        self.aux_layer_ids = list(draft.config.aux_layer_ids)
        self.device = next(draft.parameters()).device
        self.max_drafts = draft.config.block_size - 1

    @torch.no_grad()
    def begin(self, prompt_ids, aux, next_token):
        self.cache = self.draft.new_cache()
        self.draft.extend(self.cache, aux.to(self.device))
        self.anchor = int(next_token)

    @torch.no_grad()
    def propose(self, k):
        if k > self.max_drafts:
            raise ValueError(f"DFlash drafts at most block_size - 1 = {self.max_drafts} tokens per block, asked {k}")
        anchor = torch.tensor([[self.anchor]], device=self.device)
        logits = self.draft.draft_block(self.cache, anchor, self.cache.length)
        return logits[0, :k].argmax(-1).tolist()

    @torch.no_grad()
    def commit(self, new_tokens, aux):
        self.draft.extend(self.cache, aux.to(self.device))
        self.anchor = int(new_tokens[-1])
