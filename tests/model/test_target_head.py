"""TargetHead reads only norm/lm_head/embeddings and reproduces the target's logits; resolve_target forms."""

from __future__ import annotations

import torch

import modelopt_ext.targets.head as th
from modelopt_ext.targets.head import TargetHead, probs_from_logits, resolve_target
from modelopt_ext.targets.supervision import Supervision
from tests.model.conftest import VOCAB, IdentityVocab, tiny_target


def _pre_norm_last_hidden(model, ids):
    got = {}
    hook = model.model.norm.register_forward_pre_hook(lambda _m, a: got.setdefault("h", a[0]))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hook.remove()
    return got["h"], out


def _recording_safe_open(monkeypatch):
    """Record every tensor name actually read from disk."""
    reads: list[str] = []
    real = th.safe_open

    class Rec:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, k):
            reads.append(k)
            return self.inner.get_tensor(k)

    monkeypatch.setattr(th, "safe_open", Rec)
    return reads


def test_head_reproduces_logits_and_reads_only_needed(saved_target, monkeypatch):
    model, folder = saved_target
    reads = _recording_safe_open(monkeypatch)
    head = TargetHead.from_pretrained(folder)
    assert sorted(reads) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    pre, out = _pre_norm_last_hidden(model, ids)
    # vLLM id L (pre-norm) -> logits through the head == the model's own logits
    torch.testing.assert_close(head.logits(pre), out.logits, rtol=1e-5, atol=1e-5)
    # HF's hidden_states[L] is post-norm: feeding it would be the classic bug, and it does differ
    assert not torch.allclose(head.logits(out.hidden_states[-1]), out.logits, atol=1e-3)
    torch.testing.assert_close(head.embed_tokens, model.model.embed_tokens.weight)


def test_sharded_and_without_embeddings(tmp_path, monkeypatch):
    model = tiny_target(seed=4)
    model.save_pretrained(tmp_path / "t", max_shard_size="100KB")
    assert (tmp_path / "t" / "model.safetensors.index.json").is_file()
    reads = _recording_safe_open(monkeypatch)
    head = TargetHead.from_pretrained(tmp_path / "t", with_embeddings=False)
    assert sorted(reads) == ["lm_head.weight", "model.norm.weight"]
    assert head.embed_tokens is None
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    pre, out = _pre_norm_last_hidden(model, ids)
    torch.testing.assert_close(head.logits(pre), out.logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings(tmp_path, monkeypatch):
    model = tiny_target(seed=5, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "t")
    reads = _recording_safe_open(monkeypatch)
    head = TargetHead.from_pretrained(tmp_path / "t")
    assert "lm_head.weight" not in reads and "model.embed_tokens.weight" in reads
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    pre, out = _pre_norm_last_hidden(model, ids)
    torch.testing.assert_close(head.logits(pre), out.logits, rtol=1e-5, atol=1e-5)


def test_missing_files_named(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="config.json"):
        TargetHead.from_pretrained(tmp_path)


def test_resolve_target_three_forms_agree(saved_target):
    model, folder = saved_target
    head = TargetHead.from_pretrained(folder)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    pre, out = _pre_norm_last_hidden(model, ids)
    # draft vocab = the even target ids: some argmaxes fall outside it
    vocab = IdentityVocab(torch.arange(0, VOCAB, 2), VOCAB)
    am = torch.ones(2, 9, dtype=torch.bool)
    am[1, 7:] = False
    lm = torch.zeros(2, 9, dtype=torch.bool)
    lm[:, 3:] = True
    lm[1, 7:] = False
    aux = torch.zeros(2, 9, 6)
    base = {"input_ids": ids, "attention_mask": am, "loss_mask": lm, "aux_hidden_states": aux}
    p1, m1 = resolve_target(Supervision(**base, target_logits=out.logits), None, vocab)
    p2, m2 = resolve_target(Supervision(**base, target_last_hidden=pre), head, vocab)
    shipped = probs_from_logits(out.logits, vocab)
    p3, m3 = resolve_target(Supervision(**base, target_probs=shipped), None, vocab)
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
    assert torch.equal(p1, p3) and torch.equal(m1, m2) and torch.equal(m1, m3)
    assert p1.shape == (2, 9, VOCAB // 2) and p1.dtype == torch.float32
    # mask = loss_mask[t+1] & attention_mask[t] & target argmax in the draft vocab
    in_vocab = (out.logits.argmax(-1) % 2) == 0
    expect = torch.zeros(2, 9, dtype=torch.bool)
    expect[:, :-1] = lm[:, 1:]
    expect &= am & in_vocab
    assert torch.equal(m1, expect)
    assert 0 < int(m1.sum()) < int(expect.numel())
    # rows in the mask are proper distributions over the draft columns
    torch.testing.assert_close(p1[m1].sum(-1), torch.ones(int(m1.sum())))


def test_full_vocab_probs_skip_the_gather_and_equal_it():
    """Full draft vocabulary: the shortcut (no column gather) equals the general path's result."""
    from types import SimpleNamespace

    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    full = SimpleNamespace(d2t=torch.zeros(7, dtype=torch.long), t2d=torch.ones(7, dtype=torch.bool))
    got = probs_from_logits(logits, full)
    torch.testing.assert_close(got, torch.softmax(logits, -1))
    # the same vocabulary described with one id missing from t2d takes the general path (zeros rows)
    partial = SimpleNamespace(d2t=torch.zeros(6, dtype=torch.long), t2d=torch.arange(7) < 6)
    ref = probs_from_logits(logits, partial)
    rows = logits.argmax(-1) < 6
    torch.testing.assert_close(ref[rows], torch.softmax(logits[..., :6], -1)[rows])
    assert (ref[~rows] == 0).all()
