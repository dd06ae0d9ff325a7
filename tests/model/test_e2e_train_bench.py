"""E2E: the tiny target, a short colocated training run, and specdec_bench on trained vs untrained heads.

Real components throughout (the tiny target and tokenizer, the trainer CLI, the checkpoint folder the
trainer writes); a few minutes on 2 cores, so marked e2e.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelopt_ext import specdec_bench
from modelopt_ext.drafters.eagle3.loading import load_drafter
from modelopt_ext.drafters.eagle3.modeling import Eagle3DraftModel

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def _untrained_like(trained_dir: Path, out: Path) -> Path:
    """A fresh random head with the trained one's config, vocab mapping and (target) embeddings."""
    trained = load_drafter(trained_dir)
    torch.manual_seed(0)
    fresh = Eagle3DraftModel(trained.config)
    keep = {k: trained.state_dict()[k] for k in ("embed_tokens.weight", "d2t", "t2d")}
    fresh.load_state_dict({**fresh.state_dict(), **keep})
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in fresh.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(trained.config.to_dict()))
    return out


def _bench(target: Path, draft: Path, prompts: Path, out: Path) -> dict:
    rc = specdec_bench.main(
        [
            "--target",
            str(target),
            "--draft",
            str(draft),
            "--prompts",
            str(prompts),
            "--num-steps",
            "3",
            "--max-new-tokens",
            "32",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


def test_trained_drafter_beats_untrained(tmp_path):
    from modelopt_ext.targets.tiny import build_tiny_target, write_tiny_conversations

    target = build_tiny_target(tmp_path / "target")
    data = write_tiny_conversations(tmp_path / "train.jsonl", 300, seed=0)
    prompts = write_tiny_conversations(tmp_path / "eval.jsonl", 12, seed=99)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""
model: {{path: {target}, dtype: float32, aux_layer_ids: [1, 2, 3]}}
data: {{path: {data}, max_length: 256}}
eagle: {{ttt_steps: 3, draft_vocab_size: 512}}
training: {{output_dir: {tmp_path / "out"}, lr: 0.001, warmup_steps: 10, max_steps: 120, batch_size: 8,
           save_interval: 120, log_interval: 40, export_at_end: false}}
"""
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "modelopt_ext.train", "--config", str(recipe)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ckpts = sorted((tmp_path / "out").glob("epoch_*_step_120"))
    assert len(ckpts) == 1, sorted(p.name for p in (tmp_path / "out").iterdir())
    ckpt = ckpts[0]
    untrained = _untrained_like(ckpt, tmp_path / "untrained")
    a = _bench(target, untrained, prompts, tmp_path / "untrained.json")
    b = _bench(target, ckpt, prompts, tmp_path / "trained.json")
    assert a["outputs_match_greedy"] and b["outputs_match_greedy"]
    print(
        f"acceptance length: untrained {a['mean_acceptance_length']:.3f}, trained {b['mean_acceptance_length']:.3f}"
    )
    assert b["mean_acceptance_length"] > a["mean_acceptance_length"] + 0.8
