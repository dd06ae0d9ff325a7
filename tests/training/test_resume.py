"""Exact resume: interrupted + resumed runs end bit-identical to uninterrupted ones.

The interruption is the trainer's test hook (MODELOPT_EXT_STOP_AFTER_STEPS: stop right after the first
checkpoint at or after step N), so the recipe, and with it the LR schedule, is the same in both runs.
The stand-in draft has dropout: without restored RNG states the resumed run would diverge.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from standin import standin_parts

from modelopt_ext.config.recipe import parse_recipe
from modelopt_ext.training.trainer import STOP_ENV, train
from modelopt_ext.util.proc import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _recipe(out: Path, **training) -> dict:
    t = {
        "output_dir": str(out),
        "max_steps": 14,
        "batch_size": 2,
        "grad_accum": 2,
        "save_interval": 3,
        "log_interval": 2,
        "lr": 0.02,
        "warmup_steps": 2,
        "schedule": "cosine",
        "seed": 11,
        **training,
    }
    return {
        "model": {"path": "standin-target"},
        "data": {"path": "standin.jsonl"},
        "eagle": {"ttt_steps": 1},
        "training": t,
    }


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "epoch_1_step_14" / "model.safetensors"))


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), f"{k} differs"


def _optimizer_tensors(out: Path) -> list[torch.Tensor]:
    st = torch.load(out / "epoch_1_step_14" / "optimizer.pt", weights_only=True)
    return [t for s in st["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]


def test_single_process_resume_is_bit_identical(tmp_path, monkeypatch, capsys):
    full = train(parse_recipe(_recipe(tmp_path / "full")), standin_parts)
    assert full.global_step == 14 and not full.stopped_early
    # 37 samples at 4 per step -> 10 steps per epoch: step 14 is in epoch 1 (the run crosses an epoch).
    assert full.checkpoint == tmp_path / "full" / "epoch_1_step_14"

    monkeypatch.setenv(STOP_ENV, "5")
    part = train(parse_recipe(_recipe(tmp_path / "cut")), standin_parts)
    assert part.stopped_early and part.global_step == 6  # first checkpoint at or after step 5
    assert sorted(p.name for p in (tmp_path / "cut").iterdir() if p.name.startswith("epoch")) == [
        "epoch_0_step_3",
        "epoch_0_step_6",
    ]
    assert not (tmp_path / "cut" / "export").exists()
    monkeypatch.delenv(STOP_ENV)

    capsys.readouterr()
    resumed = train(parse_recipe(_recipe(tmp_path / "cut")), standin_parts, resume="auto")
    log = capsys.readouterr().out
    assert "resume: from" in log and "epoch_0_step_6" in log and "8 steps this run" in log
    assert resumed.global_step == 14
    _assert_identical(_final_weights(tmp_path / "full"), _final_weights(tmp_path / "cut"))
    for a, b in zip(_optimizer_tensors(tmp_path / "full"), _optimizer_tensors(tmp_path / "cut")):
        assert torch.equal(a, b)
    # The metrics log of the resumed run continues where the first one stopped.
    steps = [
        int(line.split('"step": ')[1].split(",")[0])
        for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [2, 4, 6, 8, 10, 12, 14]


def test_without_rng_restore_the_resume_diverges(tmp_path, monkeypatch):
    """The identity above is not vacuous: skip restoring RNG states (dropout stream) and weights differ."""
    full = train(parse_recipe(_recipe(tmp_path / "full", max_steps=6)), standin_parts)
    monkeypatch.setenv(STOP_ENV, "3")
    train(parse_recipe(_recipe(tmp_path / "cut", max_steps=6)), standin_parts)
    monkeypatch.delenv(STOP_ENV)
    monkeypatch.setattr("modelopt_ext.training.checkpoint.restore_rng_state", lambda state: None)
    resumed = train(parse_recipe(_recipe(tmp_path / "cut", max_steps=6)), standin_parts, resume="auto")
    wa = load_file(str(full.checkpoint / "model.safetensors"))
    wb = load_file(str(resumed.checkpoint / "model.safetensors"))
    assert resumed.checkpoint.name == full.checkpoint.name == "epoch_0_step_6"
    assert not torch.equal(wa["fc.weight"], wb["fc.weight"])


def _launch_two(recipe_path: Path, *extra: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
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
        str(HERE / "run_standin.py"),
        "--config",
        str(recipe_path),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.e2e
def test_two_process_gloo_preempted_resume_is_bit_identical(tmp_path):
    import yaml

    for name in ("full", "cut"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(_recipe(tmp_path / name, batch_size=1)))
    full = _launch_two(tmp_path / "full.yaml")
    assert "2 rank(s)" in full.stdout and full.stdout.count("step 14/14 epoch") == 1  # rank 0 logs alone
    assert sorted(p.name for p in (tmp_path / "full" / "epoch_1_step_14").glob("rng_state_*.pt")) == [
        "rng_state_0.pt",
        "rng_state_1.pt",
    ]
    # A preemption that reaches rank 1 only, during step 5 (batch 1 x accum 2: its 9th micro-batch): both
    # ranks agree to checkpoint step 5 (off the save interval of 3) and stop.
    cut = _launch_two(tmp_path / "cut.yaml", env_extra={"STANDIN_SIGTERM_AT": "1:9"})
    assert "stop signal on another rank" in cut.stdout
    names = sorted(p.name for p in (tmp_path / "cut").iterdir() if p.name.startswith("epoch"))
    assert names == ["epoch_0_step_3", "epoch_0_step_5"]
    assert (tmp_path / "cut" / "epoch_0_step_5" / "rng_state_1.pt").is_file()
    resumed = _launch_two(tmp_path / "cut.yaml", "--resume", "auto")
    assert "resume: from" in resumed.stdout
    _assert_identical(_final_weights(tmp_path / "full"), _final_weights(tmp_path / "cut"))


def test_resume_with_more_steps_extends_the_schedule(tmp_path, capsys):
    """Raising max_steps on resume continues training to the new end, with the new schedule length."""
    first = train(parse_recipe(_recipe(tmp_path / "run", max_steps=4, schedule="linear")), standin_parts)
    assert first.global_step == 4
    capsys.readouterr()
    more = train(
        parse_recipe(_recipe(tmp_path / "run", max_steps=8, schedule="linear")), standin_parts, resume="auto"
    )
    log = capsys.readouterr().out
    assert "total steps changed 4 -> 8" in log and more.global_step == 8
    sched = torch.load(more.checkpoint / "scheduler.pt", weights_only=True)
    assert sched["lr_lambdas"][0]["total_steps"] == 8
    assert sched["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)  # linear schedule ends at 0 at step 8


@pytest.mark.e2e
def test_two_ranks_average_gradients_like_one_rank_accumulating(tmp_path, monkeypatch):
    """2 ranks x batch 1 == 1 rank x batch 1 x grad_accum 2: same samples per step (rank r reads
    order[r::2]), gradients averaged. Equal up to float summation order, so allclose, not equal.
    Catches a missing or partial all-reduce and wrong sharding (Adam's scale invariance would hide a sum
    instead of a mean; distributed.all_reduce_mean_ divides explicitly)."""
    import yaml

    monkeypatch.setenv("STANDIN_DROPOUT", "0")
    two = _recipe(tmp_path / "two", batch_size=1, grad_accum=1, max_steps=6, save_interval=6)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    _launch_two(tmp_path / "two.yaml", env_extra={"STANDIN_DROPOUT": "0"})
    one = train(
        parse_recipe(_recipe(tmp_path / "one", batch_size=1, grad_accum=2, max_steps=6, save_interval=6)),
        standin_parts,
    )
    a = load_file(str(tmp_path / "two" / "epoch_0_step_6" / "model.safetensors"))
    b = load_file(str(one.checkpoint / "model.safetensors"))
    assert one.checkpoint.name == "epoch_0_step_6"
    for k, v in a.items():
        assert torch.allclose(v, b[k], rtol=1e-5, atol=1e-6), k


def test_sigterm_checkpoints_the_current_step_and_the_resume_is_exact(tmp_path):
    """A preemption signal mid-run: the trainer finishes the step, checkpoints it (off the save interval)
    and stops; resuming ends bit-identical to the uninterrupted run."""
    import signal

    train(parse_recipe(_recipe(tmp_path / "full")), standin_parts)
    calls = {"n": 0}

    def parts_with_sigterm(recipe, env, resume_from):
        parts = standin_parts(recipe, env, resume_from)
        inner = parts.loss_fn

        def loss_fn(*args):
            calls["n"] += 1
            if calls["n"] == 9:  # during step 5 (2 micro-batches per step)
                os.kill(os.getpid(), signal.SIGTERM)
            return inner(*args)

        parts.loss_fn = loss_fn
        return parts

    cut = train(parse_recipe(_recipe(tmp_path / "cut")), parts_with_sigterm)
    assert cut.stopped_early and cut.global_step == 5 and cut.stop_signal == signal.SIGTERM
    assert cut.checkpoint == tmp_path / "cut" / "epoch_0_step_5"  # save_interval is 3: written for the stop
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    resumed = train(parse_recipe(_recipe(tmp_path / "cut")), standin_parts, resume="auto")
    assert resumed.global_step == 14 and resumed.stop_signal is None
    _assert_identical(_final_weights(tmp_path / "full"), _final_weights(tmp_path / "cut"))


def test_epochs_without_max_steps(tmp_path):
    """Without max_steps the run is epochs x steps per epoch; checkpoints carry the epoch in their name."""
    recipe = _recipe(tmp_path / "ep", epochs=2, save_interval=100)
    del recipe["training"]["max_steps"]
    result = train(parse_recipe(recipe), standin_parts)
    # 37 samples, 4 per step (wrapped to 40) -> 10 steps per epoch.
    assert result.total_steps == 20 and result.checkpoint.name == "epoch_1_step_20"


def test_a_rerun_in_the_same_folder_continues_by_default_and_never_starts_over(tmp_path, monkeypatch, capsys):
    """No --resume: a requeued job (same output folder) continues from its last checkpoint instead of
    training from step 0 over it; --resume never starts fresh and moves the old checkpoints aside."""
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_ENV, "6")
    first = train(parse_recipe(_recipe(out)), standin_parts)
    assert first.global_step == 6
    monkeypatch.delenv(STOP_ENV)
    capsys.readouterr()
    again = train(parse_recipe(_recipe(out)), standin_parts)
    log = capsys.readouterr().out
    assert f"resume: from {out / 'epoch_0_step_6'}" in log and "8 steps this run" in log
    assert again.global_step == 14
    fresh = train(parse_recipe(_recipe(out)), standin_parts, resume="never")
    log = capsys.readouterr().out
    assert fresh.global_step == 14 and "14 steps this run" in log
    moved = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(moved) == 1 and (moved[0] / "epoch_0_step_6").is_dir(), log
    assert f"the earlier checkpoints were moved to {moved[0]}" in log
