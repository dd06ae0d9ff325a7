"""E2E on the tiny target (real tokenizer, trainer, checkpoints, specdec_bench): DFlash training lowers the
loss and drafts better than an untrained drafter; an interrupted run resumes bit-identically.

Minutes on 2 cores, so marked e2e.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelopt_ext import specdec_bench
from modelopt_ext.config.recipe import load_recipe
from modelopt_ext.drafters.dflash.loading import load_drafter
from modelopt_ext.drafters.dflash.modeling import DFlashDraftModel
from modelopt_ext.training.trainer import STOP_ENV, train

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[3]
RECIPE = REPO / "recipes" / "dflash" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    from modelopt_ext.targets.tiny import build_tiny_target, write_tiny_conversations

    cache = Path(os.environ.get("MODELOPT_EXT_TEST_CACHE", REPO / ".cache"))
    target = build_tiny_target(cache / "tiny-target")
    d = tmp_path_factory.mktemp("data")
    data = write_tiny_conversations(d / "train.jsonl", 300, seed=0)
    prompts = write_tiny_conversations(d / "eval.jsonl", 12, seed=99)
    return target, Path(data), Path(prompts)


def _overrides(target: Path, data: Path, out: Path, **training) -> list[str]:
    return [
        f"model.path={target}",
        f"data.path={data}",
        f"data.cache_dir={out.parent / 'cache'}",
        f"training.output_dir={out}",
        "training.export_at_end=false",
        *(f"training.{k}={v}" for k, v in training.items()),
    ]


def test_resume_is_bit_identical(tiny, tmp_path, monkeypatch):
    """Anchors are drawn from the RNG: the restored RNG state must give the same blocks after a resume."""
    target, data, _ = tiny
    kw = {"max_steps": 8, "batch_size": 2, "save_interval": 3, "log_interval": 2, "warmup_steps": 2}
    full = train(load_recipe(RECIPE, _overrides(target, data, tmp_path / "full", **kw)))
    assert full.global_step == 8
    monkeypatch.setenv(STOP_ENV, "4")
    part = train(load_recipe(RECIPE, _overrides(target, data, tmp_path / "cut", **kw)))
    assert part.stopped_early and part.global_step == 6
    monkeypatch.delenv(STOP_ENV)
    resumed = train(load_recipe(RECIPE, _overrides(target, data, tmp_path / "cut", **kw)), resume="auto")
    assert resumed.global_step == 8
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and "fc.weight" in a and "target_embed" not in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert ma[-1]["loss"] == mb[-1]["loss"]


def _untrained_like(trained: Path, out: Path) -> Path:
    model = load_drafter(trained)
    torch.manual_seed(0)
    fresh = DFlashDraftModel(model.config)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in fresh.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"drafter": "dflash", **model.config.to_dict()}))
    return out


def _bench(target: Path, draft: Path, prompts: Path, out: Path, steps: int) -> dict:
    rc = specdec_bench.main([
        "--target", str(target), "--draft", str(draft), "--prompts", str(prompts),
        "--num-steps", str(steps), "--max-new-tokens", "32", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    return json.loads(out.read_text())


def test_training_lowers_the_loss_and_beats_an_untrained_drafter(tiny, tmp_path):
    target, data, prompts = tiny
    out = tmp_path / "run"
    kw = {"max_steps": 120, "save_interval": 120, "log_interval": 20}
    run = subprocess.run(
        [sys.executable, "-m", "modelopt_ext.train", "--config", str(RECIPE), *_overrides(target, data, out, **kw)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1200,
        check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0], metrics[-1]
    print(f"loss {first['loss']:.3f} -> {last['loss']:.3f}, sim_accept_len {last['sim_accept_len']:.3f}")
    assert last["loss"] < 0.5 * first["loss"]
    assert last["sim_accept_len"] > first["sim_accept_len"] + 1.0
    ckpt = out / "epoch_3_step_120"
    untrained = _untrained_like(ckpt, tmp_path / "untrained")
    block = load_drafter(ckpt).config.block_size
    a = _bench(target, untrained, prompts, tmp_path / "untrained.json", block - 1)
    b = _bench(target, ckpt, prompts, tmp_path / "trained.json", block - 1)
    assert a["outputs_match_greedy"] and b["outputs_match_greedy"]
    print(f"acceptance length: untrained {a['mean_acceptance_length']:.3f}, trained {b['mean_acceptance_length']:.3f}")
    print(f"per position (trained): {b['acceptance_per_position']}")
    assert len(b["acceptance_per_position"]) == block - 1
    assert b["mean_acceptance_length"] > a["mean_acceptance_length"] + 0.8


def test_two_process_gloo_run_trains_one_model(tiny, tmp_path):
    """Two ranks under `accelerate launch` (gloo on CPU): each draws its own anchors, gradients are averaged,
    rank 0 writes one checkpoint the loader takes."""
    import socket

    target, data, _ = tiny
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "modelopt_ext.train", "--config", str(RECIPE),
        *_overrides(target, data, out, max_steps=6, batch_size=2, save_interval=6, log_interval=2),
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=900, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 rank(s)" in run.stdout
    model = load_drafter(out / "epoch_0_step_6")
    assert model.config.block_size == 8 and model.config.aux_layer_ids == [1, 2, 3]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 6 and metrics[-1]["loss"] == metrics[-1]["loss"]  # not NaN


def test_remote_supervision_trains_exactly_like_colocated(tiny, tmp_path):
    """`data.mode: remote`: a real serve_target capturing DFlash's layers (from the drafter, through
    drafters/layers.py) gives the trainer the same supervision as the target in the trainer: the same losses
    step by step and the same weights."""
    from modelopt_ext.drafters.layers import recipe_layer_ids
    from modelopt_ext.supply.target_server.process import start_serve_target
    from modelopt_ext.util.proc import stop_group

    target, data, _ = tiny
    kw = {"max_steps": 6, "batch_size": 2, "save_interval": 6, "log_interval": 1, "warmup_steps": 2}
    colocated = load_recipe(RECIPE, _overrides(target, data, tmp_path / "colocated", **kw))
    ids = recipe_layer_ids(colocated)
    proc, url = start_serve_target(
        ["--target", str(target), "--aux-layer-ids", ",".join(map(str, ids)), "--dtype", "float32",
         "--device", "cpu", "--threads", "1", "--port", "0"],
        tmp_path / "server",
    )  # fmt: skip
    try:
        remote = load_recipe(
            RECIPE,
            [*_overrides(target, data, tmp_path / "remote", **kw), "data.mode=remote", f"data.server_urls=[{url}]"],
        )
        a, b = train(colocated), train(remote)
    finally:
        stop_group(proc)
    assert a.global_step == b.global_step == 6
    served = json.loads((tmp_path / "remote" / "metrics.json").read_text())
    assert served["source"] == "remote" and served["servers"][url]["requests"] >= 6, served
    la = [json.loads(x)["loss"] for x in (tmp_path / "colocated" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "remote" / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == 6 and la == pytest.approx(lb, rel=1e-5), (la, lb)
    wa = load_file(str(a.checkpoint / "model.safetensors"))
    wb = load_file(str(b.checkpoint / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
