"""The train CLI: bad input is one line per problem and exit 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelopt_ext import train as cli

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, recipe) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _recipe(tmp_path, **training):
    return {
        "model": {"path": str(tmp_path / "target")},
        "data": {"path": str(tmp_path / "d.jsonl")},
        "training": {"output_dir": str(tmp_path / "out"), **training},
    }


def test_bad_recipe_exits_2_with_field_paths(tmp_path, capsys):
    path = _write(tmp_path, _recipe(tmp_path, lr=-1, scheduel="cosine"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", str(path), "training.batch_size=0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert any("training.lr" in line for line in err)
    assert any("training.scheduel: unknown key (did you mean 'schedule'?)" in line for line in err)
    assert any("training.batch_size" in line for line in err)
    assert all(line.startswith("error: ") for line in err)


def test_unbuilt_source_mode_is_one_line(tmp_path, capsys, monkeypatch):
    from modelopt_ext.supply import sources
    monkeypatch.delitem(sources._BUILDERS, "offline")
    path = _write(tmp_path, _recipe(tmp_path))
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", str(path), f"data.offline_dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.mode: the 'offline' source is not built yet" in err[0]


def test_resume_from_an_incomplete_checkpoint_is_one_line_no_traceback(tmp_path):
    bad = tmp_path / "out" / "epoch_0_step_5"
    bad.mkdir(parents=True)
    (bad / "model.safetensors").write_bytes(b"")
    (tmp_path / "target").mkdir()  # a model folder (resolved before training); the checkpoint is refused first
    (tmp_path / "target" / "config.json").write_text("{}")
    path = _write(tmp_path, _recipe(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "modelopt_ext.train", "--config", str(path), "--resume", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    missing = (
        "config.json, vocab_mapping.safetensors, optimizer.pt, scheduler.pt, trainer_state.json, recipe.yaml"
    )
    assert proc.stderr.strip().splitlines() == [f"error: {bad}: incomplete checkpoint, missing {missing}"]
    assert "recipe (resolved):" in proc.stdout


def test_a_folder_of_incomplete_checkpoints_is_refused_in_one_line(tmp_path):
    """Starting fresh over checkpoints needs --resume never: without it, one line naming the folder."""
    bad = tmp_path / "out" / "epoch_0_step_5"
    bad.mkdir(parents=True)
    (bad / "model.safetensors").write_bytes(b"")
    # A target folder (checked first, by modelopt_ext.targets.locate) so that the resume decision is what refuses.
    (tmp_path / "target").mkdir(exist_ok=True)
    (tmp_path / "target" / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}')
    path = _write(tmp_path, _recipe(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "modelopt_ext.train", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    expected = (
        f"error: {tmp_path / 'out'} holds checkpoints but none is complete; pass --resume never to start "
        "fresh there (they are moved aside) or --resume PATH"
    )
    assert proc.stderr.strip().splitlines() == [expected]
