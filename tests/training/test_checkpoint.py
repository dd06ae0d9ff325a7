"""Checkpoint IO: contract layout, atomic writes, picking the last complete checkpoint, RNG round-trip."""

import json
import random

import numpy as np
import pytest
import torch
from standin import StandinVocab

from modelopt_ext.training import checkpoint as ckpt
from modelopt_ext.training.distributed import DistEnv


def _content(step=1, world=1):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {
        **model.state_dict(),
        "d2t": torch.zeros(4, dtype=torch.long),
        "t2d": torch.ones(4, dtype=torch.bool),
    }
    return ckpt.CheckpointContent(
        model_state=state,
        model_config={"hidden_size": 2},
        vocab=StandinVocab(4),
        optimizer_state=opt.state_dict(),
        scheduler_state={"last_epoch": step},
        trainer_state={
            "epoch": 0,
            "global_step": step,
            "data_position": 8 * step,
            "world_size": world,
            "metrics": {},
        },
        recipe={"training": {"output_dir": "x"}},
    )


def test_layout_is_the_contract(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 0, 3, DistEnv(), _content(3))
    assert path == tmp_path / "epoch_0_step_3"
    names = {p.name for p in path.iterdir()}
    assert names == {
        "model.safetensors",
        "config.json",
        "vocab_mapping.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pt",
        "trainer_state.json",
        "recipe.yaml",
    }
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    loaded = ckpt.load_checkpoint(path)
    assert set(loaded.model_state) == {"weight", "bias", "d2t", "t2d"}
    assert loaded.model_state["d2t"].dtype == torch.long and loaded.model_state["t2d"].dtype == torch.bool
    assert loaded.trainer_state["global_step"] == 3
    assert loaded.optimizer_state["state"][0]["step"] == 1
    assert json.loads((path / "config.json").read_text()) == {"hidden_size": 2}


def test_latest_skips_temp_and_incomplete_folders(tmp_path):
    ckpt.save_checkpoint(tmp_path, 0, 2, DistEnv(), _content(2))
    ckpt.save_checkpoint(tmp_path, 1, 10, DistEnv(), _content(10))
    # A crash mid-write leaves a temp folder; a hand-copied folder may lack files; neither may be picked.
    (tmp_path / ".tmp-epoch_1_step_12").mkdir()
    broken = tmp_path / "epoch_1_step_11"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")
    assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "epoch_1_step_10"
    # Ordering is by global step, not by name (step_10 > step_2 though "10" < "2" as text).
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)][:2] == ["epoch_0_step_2", "epoch_1_step_10"]
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "epoch_1_step_10"
    assert ckpt.resolve_resume("auto", tmp_path / "nothing") is None
    # The default is 'auto': a requeued job or a re-run of the same spec continues.
    assert ckpt.resolve_resume(None, tmp_path) == tmp_path / "epoch_1_step_10"
    assert ckpt.resolve_resume("never", tmp_path) is None


def test_only_incomplete_checkpoints_are_refused_unless_never(tmp_path):
    broken = tmp_path / "epoch_0_step_4"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="none is complete; pass --resume never") as e:
        ckpt.resolve_resume(None, tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    assert ckpt.resolve_resume("never", tmp_path) is None


def test_set_aside_moves_old_checkpoints_and_temp_folders(tmp_path):
    ckpt.save_checkpoint(tmp_path, 0, 2, DistEnv(), _content(2))
    (tmp_path / ".tmp-epoch_0_step_3").mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    moved = ckpt.set_aside_checkpoints(tmp_path, "T1")
    assert moved == tmp_path / "replaced-T1"
    assert sorted(p.name for p in moved.iterdir()) == [".tmp-epoch_0_step_3", "epoch_0_step_2"]
    assert ckpt.list_checkpoints(tmp_path) == [] and (tmp_path / "metrics.jsonl").is_file()
    assert ckpt.set_aside_checkpoints(tmp_path, "T2") is None


def test_incomplete_checkpoint_named_explicitly_is_an_error(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 0, 2, DistEnv(), _content(2))
    (path / "optimizer.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing optimizer.pt"):
        ckpt.resolve_resume(str(path), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint folder"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_missing_rank_rng_state_makes_it_incomplete(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 0, 2, DistEnv(), _content(2, world=2))
    with pytest.raises(ckpt.CheckpointError, match=r"rank\(s\) \[1\]"):
        ckpt.validate_checkpoint(path)
    assert ckpt.find_latest_checkpoint(tmp_path) is None


def test_resaving_a_step_replaces_it_atomically(tmp_path):
    ckpt.save_checkpoint(tmp_path, 0, 2, DistEnv(), _content(2))
    c = _content(2)
    c.trainer_state["metrics"] = {"loss": 1.5}
    path = ckpt.save_checkpoint(tmp_path, 0, 2, DistEnv(), c)
    assert json.loads((path / "trainer_state.json").read_text())["metrics"] == {"loss": 1.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0_step_2"]


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    ckpt.seed_everything(7)
    torch.save(ckpt.capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.seed_everything(99)
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_pickles_refuse_arbitrary_objects(tmp_path):
    """Checkpoint pickles are loaded with weights_only=True: a planted object is refused, not executed."""
    path = ckpt.save_checkpoint(tmp_path, 0, 1, DistEnv(), _content(1))
    torch.save({"x": ckpt.CheckpointError("planted")}, path / "scheduler.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        ckpt.load_checkpoint(path)
