"""End to end on the real parts: the tiny Llama target (colocated), tokenised conversations, the draft
vocabulary, the EAGLE-3 head and eagle3_loss, through the real CLI under `accelerate launch`.

The tiny target is built once and cached (MODELOPT_EXT_TEST_CACHE, default <repo>/.cache), like the other
suites' e2e tests do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelopt_ext.config.recipe import load_recipe
from modelopt_ext.training.trainer import STOP_ENV, train
from modelopt_ext.util.proc import free_port

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO / "recipes" / "eagle3" / "tiny.yaml"
DRAFT_KEYS = {
    "embed_tokens.weight",
    "fc.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
    *(f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
    *(f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    *(f"layers.0.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")),
}

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> tuple[Path, Path]:
    from modelopt_ext.targets.tiny import build_tiny_target, write_tiny_conversations

    cache = Path(os.environ.get("MODELOPT_EXT_TEST_CACHE", REPO / ".cache"))
    target = build_tiny_target(cache / "tiny-target")
    data = write_tiny_conversations(tmp_path_factory.mktemp("data") / "conversations.jsonl", 48, seed=1)
    return target, Path(data)


def _overrides(target: Path, data: Path, out: Path, **training) -> list[str]:
    t = {
        "max_steps": 8,
        "batch_size": 2,
        "save_interval": 4,
        "log_interval": 2,
        "warmup_steps": 2,
        **training,
    }
    return [
        f"model.path={target}",
        f"data.path={data}",
        f"data.cache_dir={out / 'cache'}",
        f"training.output_dir={out}",
        *(f"training.{k}={v}" for k, v in t.items()),
    ]


def test_two_process_colocated_run_writes_checkpoint_and_export(tiny_inputs, tmp_path):
    target, data = tiny_inputs
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--machine_rank",
        "0",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "modelopt_ext.train",
        "--config",
        str(TINY_RECIPE),
        *_overrides(target, data, out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = proc.stdout
    assert "2 rank(s) x batch 2" in log and log.count("step 8/8 epoch") == 1
    ckpt = out / "epoch_0_step_8"
    assert {p.name for p in ckpt.iterdir()} == {
        "model.safetensors",
        "config.json",
        "vocab_mapping.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pt",
        "rng_state_1.pt",
        "trainer_state.json",
        "recipe.yaml",
    }
    weights = load_file(str(ckpt / "model.safetensors"))
    assert set(weights) == DRAFT_KEYS
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["world_size"] == 2 and state["data_position"] == 8 * 2 * 2
    config = json.loads((ckpt / "config.json").read_text())
    assert config["target_model"] == str(target) and config["aux_layer_ids"] == [1, 2, 3]
    # Frozen embeddings are the target's, untouched by training.
    target_embed = load_file(str(target / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(weights["embed_tokens.weight"], target_embed.float())
    export = json.loads((out / "export" / "config.json").read_text())
    assert export["architectures"] == ["LlamaForCausalLMEagle3"]
    assert "embed_tokens.weight" not in load_file(str(out / "export" / "model.safetensors"))
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [2, 4, 6, 8]
    assert curve[-1]["loss"] < curve[0]["loss"]
    print(
        "\n".join(
            f"step {r['step']}: loss {r['loss']:.3f} acc_0 {r['acc_0']:.3f} "
            f"sim_accept_len {r['sim_accept_len']:.3f}"
            for r in curve
        )
    )


def test_real_parts_resume_is_bit_identical(tiny_inputs, tmp_path, monkeypatch):
    target, data = tiny_inputs
    torch.set_num_threads(1)

    def run(out: Path, resume: str | None = None):
        recipe = load_recipe(
            TINY_RECIPE, _overrides(target, data, out, max_steps=6, save_interval=3, export_at_end="false")
        )
        return train(recipe, resume=resume)

    full = run(tmp_path / "full")
    monkeypatch.setenv(STOP_ENV, "3")
    cut = run(tmp_path / "cut")
    assert cut.stopped_early and cut.global_step == 3
    monkeypatch.delenv(STOP_ENV)
    resumed = run(tmp_path / "cut", resume="auto")
    assert resumed.global_step == 6
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    # The resumed run reused the vocabulary from the checkpoint.
    assert torch.equal(
        a["d2t"], load_file(str(tmp_path / "cut" / "epoch_0_step_3" / "vocab_mapping.safetensors"))["d2t"]
    )
