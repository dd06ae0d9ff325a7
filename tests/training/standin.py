"""Tiny stand-in training parts: exercise the loop, checkpoints and resume without a real target.

Deliberately small but not trivial: a frozen embedding, dropout (so resume must restore RNG state), a
deterministic synthetic "target" that produces aux states and logits, and a soft cross-entropy loss.
The real parts (tiny Llama target, EAGLE-3 head, eagle3_loss) are exercised by the e2e tests.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modelopt_ext.targets.supervision import Supervision
from modelopt_ext.training.parts import TrainingParts

VOCAB = 48
HIDDEN = 16
N_AUX = 2


class StandinVocab:
    """Identity draft vocabulary with the DraftVocab save/load file."""

    def __init__(self, size: int = VOCAB):
        self.d2t = torch.zeros(size, dtype=torch.long)
        self.t2d = torch.ones(size, dtype=torch.bool)

    def save(self, folder: Path) -> None:
        save_file({"d2t": self.d2t, "t2d": self.t2d}, str(Path(folder) / "vocab_mapping.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> StandinVocab:
        t = load_file(str(Path(folder) / "vocab_mapping.safetensors"))
        v = cls(len(t["d2t"]))
        v.d2t, v.t2d = t["d2t"], t["t2d"]
        return v


class StandinDraft(nn.Module):
    """embed (frozen) + fc over aux states -> dropout -> lm_head; d2t/t2d buffers like the real head."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(N_AUX * HIDDEN, HIDDEN, bias=False)
        # STANDIN_DROPOUT=0 makes the step deterministic across ranks (data-parallel equivalence test).
        self.drop = nn.Dropout(float(os.environ.get("STANDIN_DROPOUT", "0.2")))
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.register_buffer("d2t", torch.zeros(VOCAB, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(VOCAB, dtype=torch.bool))

    def forward(self, input_ids: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        h = self.fc(aux) + self.embed_tokens(input_ids)
        return self.lm_head(self.drop(torch.tanh(h)))


class StandinTarget:
    """A fixed random 'target' (its own generator: independent of the training RNG)."""

    def __init__(self):
        g = torch.Generator().manual_seed(1234)
        self.emb = torch.randn(VOCAB, HIDDEN, generator=g)
        self.mix = torch.randn(N_AUX, HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5
        self.out = torch.randn(HIDDEN, VOCAB, generator=g)

    def __call__(self, batch: dict[str, torch.Tensor]) -> Supervision:
        x = self.emb[batch["input_ids"]]
        aux = torch.cat([torch.tanh(x @ self.mix[i]) for i in range(N_AUX)], dim=-1)
        return Supervision(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            loss_mask=batch["loss_mask"],
            aux_hidden_states=aux,
            target_logits=torch.tanh(x) @ self.out,
        )


def standin_loss(model, sup: Supervision, vocab, head):
    """Soft cross-entropy against the target distribution on supervised positions, plus metrics."""
    logits = model(sup.input_ids, sup.aux_hidden_states).float()
    target = torch.softmax(sup.target_logits.float(), dim=-1)
    mask = (sup.loss_mask & sup.attention_mask).float()
    per_pos = -(target * torch.log_softmax(logits, dim=-1)).sum(-1)
    loss = (per_pos * mask).sum() / mask.sum().clamp(min=1)
    acc = ((logits.argmax(-1) == target.argmax(-1)).float() * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"loss_0": loss.detach(), "acc_0": acc, "sim_accept_len": 1.0 + acc}


def make_dataset(n: int = 37, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    """Sequences of varying length; the second half of each is 'assistant' (supervised)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        t = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (t,), generator=g)
        mask = torch.zeros(t, dtype=torch.bool)
        mask[t // 2 :] = True
        items.append({"input_ids": ids, "loss_mask": mask})
    return items


def collate(items: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right padding, like data.dataset.collate_padded."""
    t = max(len(i["input_ids"]) for i in items)
    ids = torch.full((len(items), t), pad_id, dtype=torch.long)
    att = torch.zeros(len(items), t, dtype=torch.bool)
    lm = torch.zeros(len(items), t, dtype=torch.bool)
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        ids[r, :n], att[r, :n], lm[r, :n] = it["input_ids"], True, it["loss_mask"]
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm}


def standin_parts(recipe, env, resume_from) -> TrainingParts:
    """A PartsFactory over the stand-ins (vocab restored from the checkpoint when resuming)."""
    vocab = StandinVocab.load(resume_from) if resume_from else StandinVocab()
    model = StandinDraft()

    def export(ckpt_dir: Path, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes((Path(ckpt_dir) / "model.safetensors").read_bytes())
        return out

    return TrainingParts(
        dataset=make_dataset(),
        collate=collate,
        source=StandinTarget(),
        model=model,
        model_config={"kind": "standin", "vocab_size": VOCAB},
        vocab=vocab,
        head=None,
        loss_fn=_maybe_sigterm(standin_loss, env.rank),
        export_fn=export,
    )


def _maybe_sigterm(loss_fn, rank: int):
    """STANDIN_SIGTERM_AT=RANK:CALL: that rank sends itself SIGTERM at its CALL-th loss evaluation
    (simulates a preemption that reaches one rank only)."""
    spec = os.environ.get("STANDIN_SIGTERM_AT", "")
    if not spec or int(spec.split(":")[0]) != rank:
        return loss_fn
    at = int(spec.split(":")[1])
    calls = {"n": 0}

    def wrapped(*args):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_fn(*args)

    return wrapped
