"""specdec_bench's proposer for EAGLE-3: drafts the way vLLM runs the head (cached step-0 keys + a chain)."""

from __future__ import annotations

import torch

from modelopt_ext.drafters.eagle3.modeling import DraftCache, Eagle3DraftModel


class Eagle3Proposer:
    """Drafts with an EAGLE-3 head the way vLLM runs it (cached step-0 keys + a per-round chain)."""

    def __init__(self, draft: Eagle3DraftModel):
        self.draft = draft.eval()
        self.aux_layer_ids = list(draft.config.aux_layer_ids)
        self.device = next(draft.parameters()).device

    @torch.no_grad()
    def begin(self, prompt_ids, aux, next_token):
        self.cache = DraftCache()
        ids = torch.tensor([list(prompt_ids[1:]) + [next_token]], device=self.device)
        self.pending = self.draft.extend(self.cache, ids, aux.to(self.device))
        self.last_pos = len(prompt_ids) - 1

    @torch.no_grad()
    def propose(self, k):
        logits, hidden = self.pending
        chain = DraftCache()
        tok = self.draft.draft_to_target(logits[:, -1].argmax(-1, keepdim=True))
        drafts = [int(tok)]
        for j in range(1, k):
            logits, hidden = self.draft.chain_step(self.cache, chain, tok, hidden, self.last_pos + j)
            tok = self.draft.draft_to_target(logits[:, -1].argmax(-1, keepdim=True))
            drafts.append(int(tok))
        return drafts

    @torch.no_grad()
    def commit(self, new_tokens, aux):
        ids = torch.tensor([new_tokens], device=self.device)
        self.pending = self.draft.extend(self.cache, ids, aux.to(self.device))
        self.last_pos += len(new_tokens)
