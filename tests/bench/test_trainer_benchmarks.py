"""Smoke tests of the trainer benchmarks (bench/ttt_memory.py, bench/gpu_check.sh --cpu, bench/vs_modelopt.py):
the tables come out whole, with a figure in every cell; the figures themselves are not checked (benchmarks,
not timed tests)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modelopt_ext.bench import ttt_memory, vs_modelopt

REPO = Path(__file__).resolve().parents[2]


def test_modelopt_export_aux_ids_are_mapped_to_vllm_numbering(tmp_path):
    """Model-Optimizer nests 0-based layer-output ids under eagle_config; the mapped copy has them + 1 at
    the top level (what our loader and vLLM read), and links the weights."""
    src = tmp_path / "export"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "config.json").write_text(
        json.dumps({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 2, 5]}})
    )
    dst = Path(vs_modelopt.map_modelopt_export(src, tmp_path / "mapped"))
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 5]  # the original kept
    assert (dst / "model.safetensors").read_bytes() == b"weights"
    (src / "config.json").write_text(json.dumps({"architectures": ["x"]}))
    with pytest.raises(RuntimeError, match="no eagle_config.eagle_aux_hidden_state_layer_ids"):
        vs_modelopt.map_modelopt_export(src, tmp_path / "mapped2")


def test_speedup_line_is_last_and_rows_are_whole():
    rows = [
        {"run": "ours", "samples_per_s": 6.0, "peak_mb": 500, "first_step_s": None, "accept_len": 1.5,
         "padding_waste": 0.2},
        {"run": "modelopt eager", "samples_per_s": 4.0, "peak_mb": 900, "first_step_s": 3.0, "accept_len": 1.4,
         "padding_waste": 0.5},
        {"run": "modelopt compiled", "error": "boom"},
    ]  # fmt: skip
    meta = {"batch_size": 8, "max_length": 256, "ttt_steps": 3, "vocab": 1024, "dtype": "fp32", "device": "cpu",
            "threads": 1, "steps": 4, "warmup": 1}  # fmt: skip
    table = vs_modelopt.format_table(rows, meta).splitlines()
    assert table[-1] == "speedup vs nvidia-modelopt eager: 1.50x"
    assert any(line.split()[:3] == ["ours", "6.00", "1.50x"] for line in table)
    assert any("modelopt compiled" in line and "boom" in line for line in table)


@pytest.mark.e2e
def test_ttt_memory_sweep_table(tmp_path, capsys):
    out = tmp_path / "mem.json"
    argv = ["--lengths", "64,128,256", "--impls", "auto,dense", "--hidden", "64", "--heads", "2",
            "--vocab", "256", "--json", str(out)]  # fmt: skip
    assert ttt_memory.main(argv) == 0
    data = json.loads(out.read_text())
    assert [(r["impl"], r["T"]) for r in data["rows"]] == [
        (i, t) for i in ("auto", "dense") for t in (64, 128, 256)
    ]
    assert all(r["peak_mb"] > 0 and r["seconds"] > 0 for r in data["rows"])
    assert [s["impl"] for s in data["summary"]] == ["auto", "dense"]
    for s in data["summary"]:
        assert math.isfinite(s["mb_per_1k_tokens"]) and s["longest_T_in_budget"] > 0
    printed = capsys.readouterr().out
    assert "TTT memory sweep" in printed and "longest T in" in printed


@pytest.mark.e2e
def test_gpu_check_cpu_mode_prints_every_section(tmp_path):
    """The device check's CPU mode, through its shell entry point, as the lead runs it on a GPU machine."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "GPU_CHECK_TIMEOUT": "1200"}
    r = subprocess.run(
        ["bash", str(REPO / "modelopt_ext" / "bench" / "gpu_check.sh"), "--cpu", "--workdir", str(tmp_path / "w")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1300, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (tmp_path / "out" / "gpu_check.txt").read_text()
    sections = [line.split()[0] for line in table.splitlines()[2:] if line and not line.startswith("total")]
    for s in ("attention", "train", "serve", "memory", "modelopt"):
        assert s in sections, table
    assert re.search(r"^train .* ok +[\d.]+ samples/s", table, re.MULTILINE), table
    assert re.search(r"^serve .*data plane gloo +ok", table, re.MULTILINE), table
    assert "FAIL" not in table
    assert (tmp_path / "out" / "serve_target.log").is_file()


@pytest.mark.e2e
def test_vs_modelopt_quick_table_is_whole(tmp_path):
    """The comparison end to end (its venv is built on first use): ours and modelopt eager rows with every
    figure, and the speedup as the last line."""
    cmd = [sys.executable, "-m", "modelopt_ext.bench.vs_modelopt", "--quick", "--steps", "2", "--warmup", "1",
           "--prompts", "2", "--workdir", str(tmp_path), "--json", str(tmp_path / "vs.json")]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1700, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"speedup vs nvidia-modelopt eager: \d+\.\d\dx", lines[-1]), lines[-1]
    rows = json.loads((tmp_path / "vs.json").read_text())["rows"]
    assert [row["run"] for row in rows] == ["ours", "modelopt eager"]
    for row in rows:
        for key in ("samples_per_s", "peak_mb", "accept_len", "padding_waste"):
            assert math.isfinite(row[key]) and row[key] >= 0, row
        assert row["accept_len"] >= 1.0


@pytest.mark.e2e
def test_levers_prints_every_variant(capsys):
    """bench/levers end to end on the tiny recipe: a header naming the drafter, then one row per variant."""
    from modelopt_ext.bench import levers

    assert levers.main(["--steps", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("levers: "))
    assert "drafter eagle3 (" in out[header]
    rows = [line.split() for line in out[header + 1 :]]
    assert [r[0] for r in rows] == ["baseline", "+attention", "+sel."]
    assert all(float(r[-5]) > 0 for r in rows) and rows[0][-1] == "1.00x"
