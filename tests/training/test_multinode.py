"""Two 'machines' on one host: `accelerate launch --multi_gpu --num_machines 2 --machine_rank R` twice, as the
trainer nodes of a job run it (gloo on CPU). Checks the launch path and that the two ranks train as one
data-parallel job: equal (up to float summation order) to one rank accumulating the same samples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from standin import standin_parts

from modelopt_ext.config.recipe import parse_recipe
from modelopt_ext.training.trainer import train
from modelopt_ext.util.proc import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

pytestmark = pytest.mark.e2e


def _recipe(out: Path, **training) -> dict:
    t = {
        "output_dir": str(out),
        "max_steps": 6,
        "batch_size": 1,
        "grad_accum": 1,
        "save_interval": 3,
        "log_interval": 2,
        "lr": 0.02,
        "seed": 3,
        **training,
    }
    return {
        "model": {"path": "standin"},
        "data": {"path": "standin.jsonl"},
        "eagle": {"ttt_steps": 1},
        "training": t,
    }


def test_two_machines_train_as_one_job(tmp_path, monkeypatch):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe(tmp_path / "mn")))
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STANDIN_DROPOUT": "0"}
    procs = []
    for machine_rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_machines",
            "2",
            "--machine_rank",
            str(machine_rank),
            "--num_processes",
            "2",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(HERE / "run_standin.py"),
            "--config",
            str(tmp_path / "r.yaml"),
        ]
        out = open(tmp_path / f"machine{machine_rank}.log", "w")  # noqa: SIM115 (closed below, after wait)
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT), out))
    try:
        codes = [p.wait(timeout=400) for p, _ in procs]
    finally:
        for p, out in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
            out.close()
    logs = [(tmp_path / f"machine{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "2 rank(s) x batch 1" in logs[0] and "step 6/6 epoch" in logs[0]
    assert "step 6/6 epoch" not in logs[1]  # only global rank 0 logs
    ckpt = tmp_path / "mn" / "epoch_0_step_6"
    assert {p.name for p in ckpt.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}

    monkeypatch.setenv("STANDIN_DROPOUT", "0")
    one = train(parse_recipe(_recipe(tmp_path / "one", grad_accum=2)), standin_parts)
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(one.checkpoint / "model.safetensors"))
    for k, v in a.items():
        assert torch.allclose(v, b[k], rtol=1e-5, atol=1e-6), k
