"""A real training run (Trainer + streaming dataset + DataLoader worker + a vLLM-like server in its own process)
says it was starved when the server is slow, and does not when it keeps up; its report files agree with
metrics.jsonl. The drafter is a stand-in (a linear head, compute simulated by a short sleep) so the run takes
seconds; everything between the server and the loss is the real code."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelopt_ext.config.recipe import parse_recipe
from modelopt_ext.supply.vllm.source import build_streaming_source
from modelopt_ext.training.parts import TrainingParts
from modelopt_ext.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "streaming"))
from fake_vllm import spawn

# Real training runs against a real server process: seconds on a quiet machine, minutes on a loaded one.
pytestmark = pytest.mark.e2e

HIDDEN, LAYERS, VOCAB = 8, 3, 64  # aux ids of a 3-layer target: [1, 2]; the server captures [1, 2, 3]
COMPUTE_S = 0.2  # the stand-in drafter's step time


class Vocab:
    def __init__(self):
        self.d2t = torch.zeros(VOCAB, dtype=torch.long)
        self.t2d = torch.ones(VOCAB, dtype=torch.bool)

    def save(self, folder):
        save_file({"d2t": self.d2t, "t2d": self.t2d}, str(Path(folder) / "vocab_mapping.safetensors"))


def _loss(model, sup, vocab, head):
    time.sleep(COMPUTE_S)  # a real drafter's forward/backward takes a while; this one is tiny
    target = torch.softmax(head.logits(sup.target_last_hidden).float(), -1)
    logits = model(sup.aux_hidden_states.float())
    mask = (sup.loss_mask & sup.attention_mask).float()
    loss = (-(target * torch.log_softmax(logits, -1)).sum(-1) * mask).sum() / mask.sum().clamp(min=1)
    acc = ((logits.argmax(-1) == target.argmax(-1)).float() * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"loss_0": loss.detach(), "acc_0": acc, "sim_accept_len": 1 + acc}


def _target(d: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    d.mkdir()
    cfg = {"model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "vocab_size": VOCAB}
    (d / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}))
    save_file(
        {
            "model.norm.weight": torch.rand(HIDDEN, generator=g) + 0.5,
            "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g),
            "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
        },
        str(d / "model.safetensors"),
    )
    return d


def _run(tmp_path: Path, write_delay_s: float) -> Path:
    root = tmp_path / "shared"
    root.mkdir()
    proc, url = spawn(str(root), n_layers=LAYERS, hidden=HIDDEN, write_delay_s=write_delay_s)
    out = tmp_path / "out"
    try:
        recipe = parse_recipe(
            {
                "model": {"path": str(_target(tmp_path / "target")), "dtype": "float32"},
                "data": {
                    "path": "unused.jsonl",
                    "server_urls": [url],
                    "shared_storage_root": str(root),
                    "num_workers": 1,
                },
                "training": {
                    "output_dir": str(out),
                    "max_steps": 5,
                    "batch_size": 2,
                    "log_interval": 2,
                    "save_interval": 100,
                    "export_at_end": False,
                    "dtype": "float32",
                },
            }
        )
        convs = [
            {
                "input_ids": torch.arange(1, 6 + i % 4) % VOCAB,
                "loss_mask": torch.ones(5 + i % 4, dtype=torch.bool),
            }
            for i in range(16)
        ]

        def parts(recipe, env, resume):
            setup = build_streaming_source(recipe, env, convs, pad_id=0)
            return TrainingParts(
                dataset=setup.dataset,
                collate=setup.collate,
                source=setup.source,
                model=torch.nn.Linear(2 * HIDDEN, VOCAB),
                model_config={},
                vocab=Vocab(),
                head=setup.head,
                loss_fn=_loss,
            )

        Trainer(recipe, parts).train()
    finally:
        proc.kill()
        proc.wait(timeout=10)
    return out


def _check_report_matches_jsonl(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    assert [r["step"] for r in recs] == [2, 4, 5] and m["steps"] == last["step"] == 5
    assert m["samples"] == last["run_samples"] == 10 and m["tokens"] == last["run_tokens"] > 0
    for k in ("loss", "loss_0", "acc_0", "sim_accept_len"):
        assert m["final"][k] == pytest.approx(last[k])
    assert m["sim_accept_len"] == pytest.approx(last["sim_accept_len"])
    assert all(0 <= r["data_wait_frac"] <= 1 for r in recs)
    # Hidden-state bytes: 3 captured layers x HIDDEN fp32 per token (+ the file's token ids and header).
    assert m["hs_bytes_per_sample"] > 3 * HIDDEN * 4 * 5
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (srv,) = m["servers"].values()
    # Counted in the DataLoader worker process, seen by the trainer: requests at least the samples trained on.
    assert srv["requests"] >= m["samples"] and srv["errors"] == 0
    return m


def test_slow_server_run_says_starved(tmp_path, capsys):
    out = _run(tmp_path, write_delay_s=0.5)  # one worker, 2 samples/batch x 0.5 s vs 0.2 s compute
    m = _check_report_matches_jsonl(out)
    assert m["starved"] and m["data_wait_frac"] > 0.4
    assert m["demand_tokens_per_s"] > 1.5 * m["supply_tokens_per_s"]
    (srv,) = m["servers"].values()
    assert srv["lat_p50_ms"] > 400
    summary = (out / "summary.txt").read_text()
    assert "STARVED" in summary and "more serve nodes" in summary and "STREAMING_NUM_WORKERS" in summary
    printed = capsys.readouterr().out
    assert "STARVED" in printed and "| wait " in printed and "  servers: 127.0.0.1:" in printed


def test_fast_server_run_is_not_starved(tmp_path):
    out = _run(tmp_path, write_delay_s=0.0)
    m = _check_report_matches_jsonl(out)
    summary = (out / "summary.txt").read_text()
    assert not m["starved"] and "STARVED" not in summary and "supply kept up" in summary
