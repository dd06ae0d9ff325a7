"""modelopt_ext.job_info (recipe -> shell assignments for the entry scripts) and modelopt_ext.job_summary."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from modelopt_ext.job_info import CaptureIdsError, job_info
from modelopt_ext.job_summary import main as summary_main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def recipe(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"num_hidden_layers": 32, "hidden_size": 64}))
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {{path: {target}, dtype: bfloat16}}\n"
        "data: {path: d.jsonl, max_length: 512}\n"
        "training: {output_dir: 'out dir/x'}\n"
    )
    return path, target


def test_job_info_resolves_defaults_and_overrides(recipe):
    path, target = recipe
    info = job_info(str(path), [])
    assert info["JOB_TARGET"] == str(target) and info["JOB_DTYPE"] == "bfloat16"
    assert info["JOB_AUX_IDS"] == "2,16,29" and info["JOB_CAPTURE_IDS"] == "2,16,29,32"
    assert info["JOB_OUTPUT_DIR"] == "out dir/x" and info["JOB_MAX_LENGTH"] == "512"
    info = job_info(str(path), ["model.aux_layer_ids=[1,5,9]"])
    assert info["JOB_CAPTURE_IDS"] == "1,5,9,32" and info["JOB_LAYER_OVERRIDE"] == ""


@pytest.mark.parametrize("text", ["[3, 7, 32]", "3,7,32"])
def test_job_info_capture_ids_become_the_trainers_layers(recipe, text):
    # The servers capture what the entry script was told (EAGLE_CAPTURE_IDS); the trainers read the same.
    path, _ = recipe
    info = job_info(str(path), [], capture_ids=text)
    assert info["JOB_CAPTURE_IDS"] == "3,7,32" and info["JOB_AUX_IDS"] == "3,7"
    assert info["JOB_LAYER_OVERRIDE"] == "model.aux_layer_ids=[3,7]"


@pytest.mark.parametrize(
    "text,message",
    [
        ("3,7,31", "must end with the target's layer count 32"),
        ("32", "needs the drafter's layer ids before the last id"),
        ("3,40,32", "outside [0, 32]"),
        ("3,3,32", "must be distinct"),
        ("3,,x", "expected comma-separated integers"),
    ],
)
def test_job_info_refuses_capture_ids_that_do_not_fit_the_target(recipe, text, message):
    path, _ = recipe
    with pytest.raises(CaptureIdsError, match=f"^--capture-ids '{re.escape(text)}': .*{re.escape(message)}"):
        job_info(str(path), [], capture_ids=text)


def test_job_info_cli_prints_shell_safe_assignments(recipe):
    path, _ = recipe
    r = subprocess.run(
        [sys.executable, "-m", "modelopt_ext.job_info", "--config", str(path), "--resume", "auto"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = subprocess.run(
        ["bash", "-c", f'eval {shlex.quote(r.stdout)}; printf \'%s|\' "$JOB_OUTPUT_DIR" "$JOB_AUX_IDS"'],
        check=False,
        capture_output=True,
        text=True,
    ).stdout
    assert out == "out dir/x|2,16,29|"


def test_job_info_cli_bad_override_is_one_line(recipe):
    path, _ = recipe
    r = subprocess.run(
        [sys.executable, "-m", "modelopt_ext.job_info", "--config", str(path), "training.lr=-1"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "training.lr" in r.stderr


def _complete_checkpoint_files(folder: Path, step: int) -> None:
    from modelopt_ext.training.checkpoint import REQUIRED_FILES, STATE_FILE, rng_file

    folder.mkdir(parents=True)
    for name in (*REQUIRED_FILES, rng_file(0)):
        (folder / name).write_text("")
    state = {"epoch": 0, "global_step": step, "data_position": 0, "world_size": 1}
    (folder / STATE_FILE).write_text(json.dumps(state))


def test_summary(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "export").mkdir(parents=True)
    (out / "export" / "config.json").write_text("{}")
    for step in (40, 80):  # complete as far as the checkpoint validator looks (names and fields)
        _complete_checkpoint_files(out / f"epoch_0_step_{step}", step)
    (out / "epoch_0_step_120").mkdir()  # a newer one the trainer never finished: not the "last" one
    rec = {
        "step": 80,
        "loss": 6.5,
        "acc_0": 0.5,
        "acc_1": 0.4,
        "sim_accept_len": 1.9,
        "samples_per_s": 4.2,
        "tokens_per_s": 300.0,
    }
    (out / "metrics.jsonl").write_text(json.dumps(rec) + "\n" + '{"step": 9')  # torn last line ignored
    bench = tmp_path / "b.json"
    bench.write_text(
        json.dumps(
            {
                "num_prompts": 8,
                "num_steps": 3,
                "mean_acceptance_length": 1.75,
                "tokens_per_s_speculative": 30.0,
                "tokens_per_s_baseline": 20.0,
                "speedup": 1.5,
            }
        )
    )
    notes = tmp_path / "notes.txt"
    notes.write_text("reused: tiny target\n")
    assert (
        summary_main(
            [
                "--output",
                str(out),
                "--target",
                "t",
                "--bench",
                str(bench),
                "--notes",
                str(notes),
                "--write",
                str(out / "summary.txt"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text == (out / "summary.txt").read_text()
    assert f"drafter (export, loads in vLLM/SGLang): {out / 'export'}" in text
    assert f"last training checkpoint:               {out / 'epoch_0_step_80'}" in text
    assert "acceptance length (specdec_bench, 8 prompts, k=3): 1.75" in text
    # 1 + 0.5 + 0.5 * 0.4: the trainer's chain expectation over the positions it recorded
    assert "acceptance length (trainer simulation, step 80, training data, k=3): 1.70 (only 2 TTT steps" in text
    assert "training throughput: 4.20 samples/s, 300 tokens/s" in text
    assert "python -m modelopt_ext.serve_sglang --target t --draft" in text and "reused: tiny target" in text


def test_summary_without_export_is_one_line(tmp_path, capsys):
    assert summary_main(["--output", str(tmp_path), "--target", "t"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no export/config.json" in err
