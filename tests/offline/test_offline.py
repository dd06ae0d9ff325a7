"""Offline supervision: the dump's numerical contract with the colocated source, resumable and atomic writing,
one-line refusals of bad input (corrupt / truncated shards, folders that are not dumps, dumps made for
something else, a disk too small or full), sharding over ranks, and hybrid mode (first epoch fills the dump).

All on a real (small) Llama target in this process; hybrid mode streams from the loopback fake vLLM server
(the real request / file contract; a dump from a real vLLM server: tests/e2e/test_offline_example.py).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from modelopt_ext.supply import offline as od
from modelopt_ext.supply.sources import make_source
from modelopt_ext.targets.head import resolve_target
from modelopt_ext.training.distributed import DistEnv
from modelopt_ext.training.dump import dump_supervision
from modelopt_ext.training.parts import build_vocab, load_dataset
from modelopt_ext.util.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
QUIET = {"log": lambda m: None}


def _shards(folder: Path) -> dict[str, dict]:
    """Every shard's tensors and metadata (the header's key order is not deterministic, so not raw bytes)."""
    from safetensors import safe_open

    out = {}
    for p in sorted(folder.glob("shard-*")):
        with safe_open(str(p), framework="pt") as f:
            out[p.name] = {"meta": f.metadata(), **{k: f.get_tensor(k) for k in f.keys()}}  # noqa: SIM118
    return out


def _same_shards(a: Path, b: Path) -> bool:
    sa, sb = _shards(a), _shards(b)
    if sa.keys() != sb.keys():
        return False
    return all(
        sa[n]["meta"] == sb[n]["meta"] and all(torch.equal(sa[n][k], sb[n][k]) for k in sa[n] if k != "meta")
        for n in sa
    )


def _setup(recipe):
    """(dataset, vocab, SourceSetup) for a recipe, as the trainer builds them."""
    env = DistEnv()
    tok = AutoTokenizer.from_pretrained(recipe.model.path)
    ds = load_dataset(recipe, DistEnv(rank=1, world_size=2), tok)  # rank 1: no log lines
    vocab = build_vocab(recipe, env, ds, tok, 1024, None)
    return ds, vocab, make_source(recipe, env, ds, 0, vocab)


def _resolved(setup, vocab, idx):
    sup = setup.source(setup.collate([setup.dataset[i] for i in idx]))
    probs, mask = resolve_target(sup, setup.head, vocab)
    return sup, probs, mask


@pytest.fixture(scope="module")
def fp32_dump(tmp_path_factory, small_target, conversations):
    """One fp32 dump of the conversations (3 samples per shard), shared by the read-only tests."""
    from modelopt_ext.config.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("fp32")
    recipe = load_recipe(
        REPO / "recipes" / "eagle3" / "tiny.yaml",
        [
            f"model.path={small_target}",
            f"data.path={conversations}",
            f"data.cache_dir={tmp / 'cache'}",
            f"training.output_dir={tmp / 'out'}",
            "eagle.draft_vocab_size=200",
        ],
    )
    res = dump_supervision(recipe, tmp / "dump", dtype="float32", samples_per_shard=3, **QUIET)
    assert res.index is not None and res.shards_written == 4
    return tmp / "dump"


def test_fp32_dump_is_the_colocated_supervision_bit_for_bit(make_recipe, fp32_dump):
    ds, vocab, colocated = _setup(make_recipe())
    _, _, offline = _setup(make_recipe(f"data.offline_dir={fp32_dump}"))
    assert offline.aux_layer_ids == colocated.aux_layer_ids
    for i in range(len(ds)):
        a, pa, ma = _resolved(colocated, vocab, [i])
        b, pb, mb = _resolved(offline, vocab, [i])
        assert b.target_last_hidden is not None and b.target_last_hidden.dtype == torch.float32
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
        assert torch.equal(a.aux_hidden_states, b.aux_hidden_states), i
        assert torch.equal(pa, pb) and torch.equal(ma, mb), i
        assert bool(ma.any())


def test_bf16_dump_is_within_bf16_tolerance_and_half_the_bytes(make_recipe, fp32_dump, tmp_path):
    recipe = make_recipe()
    dump_supervision(recipe, tmp_path / "bf16", dtype="bfloat16", samples_per_shard=3, **QUIET)
    idx16 = json.loads((tmp_path / "bf16" / "index.json").read_text())
    idx32 = json.loads((fp32_dump / "index.json").read_text())
    assert idx16["storage_dtype"] == "bfloat16"
    # ids (8 B) and mask (1 B) per token are not halved; the states (4 x 128 per token) are.
    assert 0.5 < idx16["bytes"] / idx32["bytes"] < 0.53
    ds, vocab, colocated = _setup(recipe)
    _, _, b16 = _setup(make_recipe(f"data.offline_dir={tmp_path / 'bf16'}"))
    for i in range(len(ds)):
        a, pa, ma = _resolved(colocated, vocab, [i])
        b, pb, mb = _resolved(b16, vocab, [i])
        assert b.aux_hidden_states.dtype == torch.bfloat16
        ref = a.aux_hidden_states
        assert torch.equal(b.aux_hidden_states, ref.to(torch.bfloat16))  # exactly the rounded fp32 values
        err = (b.aux_hidden_states.float() - ref).abs()
        assert bool((err <= ref.abs() * 2**-8 + 1e-6).all())
        # Probabilities from bf16-rounded last states: bf16-level error, the same argmax almost everywhere.
        assert float((pa - pb).abs().max()) < 0.05
        assert float((ma == mb).float().mean()) > 0.95


def test_restart_skips_finished_shards_and_cleans_torn_temps(make_recipe, fp32_dump, tmp_path):
    out = tmp_path / "d"
    recipe = make_recipe()
    dump_supervision(recipe, out, dtype="float32", samples_per_shard=3, **QUIET)
    (out / "index.json").unlink()
    (out / "shard-000000003.safetensors").unlink()
    (out / ".shard-000000003.safetensors.abc.tmp").write_bytes(b"torn")  # a writer killed mid-shard
    res = dump_supervision(recipe, out, dtype="float32", samples_per_shard=3, **QUIET)
    assert (res.shards_written, res.shards_skipped) == (1, 3)
    assert _same_shards(out, fp32_dump)
    assert not list(out.glob(".*.tmp")) and res.index is not None
    # and a rerun of a finished dump writes nothing
    assert dump_supervision(recipe, out, dtype="float32", samples_per_shard=3, **QUIET).shards_written == 0


def test_two_ranks_split_the_shards_and_the_last_writes_the_index(make_recipe, fp32_dump, tmp_path):
    out = tmp_path / "d"
    recipe = make_recipe()
    r1 = dump_supervision(recipe, out, dtype="float32", samples_per_shard=3, rank=1, world_size=2, **QUIET)
    assert r1.shards_written == 2 and r1.index is None and not (out / "index.json").exists()
    r0 = dump_supervision(recipe, out, dtype="float32", samples_per_shard=3, rank=0, world_size=2, **QUIET)
    assert r0.shards_written == 2 and r0.index is not None
    assert _same_shards(out, fp32_dump)


def test_disk_full_mid_dump_leaves_no_shard_and_resumes(make_recipe, fp32_dump, tmp_path, monkeypatch):
    out = tmp_path / "d"
    recipe = make_recipe()
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the third shard hits a full disk
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(od.os, "fsync", fsync)
    with pytest.raises(od.OfflineError) as e:
        dump_supervision(recipe, out, dtype="float32", samples_per_shard=3, **QUIET)
    msg = str(e.value)
    assert "\n" not in msg and "disk full" in msg and "shard-000000006.safetensors" in msg and str(out) in msg
    assert sorted(p.name for p in out.iterdir()) == [
        "plan.json",
        "shard-000000000.safetensors",
        "shard-000000003.safetensors",
    ]
    monkeypatch.setattr(od.os, "fsync", real_fsync)
    res = dump_supervision(recipe, out, dtype="float32", samples_per_shard=3, **QUIET)
    assert (res.shards_written, res.shards_skipped) == (2, 2) and res.index is not None
    assert _same_shards(out, fp32_dump)


def test_a_dump_that_would_not_fit_is_refused_before_computing(make_recipe, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(ConfigError) as e:
        dump_supervision(make_recipe(), tmp_path / "d", dtype="float32", **QUIET)
    (line,) = e.value.lines()
    assert str(tmp_path / "d") in line and "needs" in line and "only 4.9 KiB is free" in line
    assert not list((tmp_path / "d").glob("shard-*"))


def test_corrupt_and_truncated_shards_are_one_line_naming_the_file(fp32_dump, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(fp32_dump, bad)
    shard = bad / "shard-000000003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x40  # one flipped bit in the last sample's states
    shard.write_bytes(bytes(data))
    good = od.ShardReader(fp32_dump, od.open_dump(fp32_dump))
    ds = od.OfflineDataset([good.read(i) for i in range(10)], bad, od.open_dump(bad))
    assert len(ds[3]["input_ids"]) > 0  # the other samples of the shard still verify
    with pytest.raises(od.OfflineError) as e:
        ds[5]
    assert "\n" not in str(e.value) and str(shard) in str(e.value) and "checksum" in str(e.value)

    shard2 = bad / "shard-000000006.safetensors"
    shard2.write_bytes(shard2.read_bytes()[:-500])  # truncated
    with pytest.raises(od.OfflineError) as e:
        ds[6]
    assert "\n" not in str(e.value) and str(shard2) in str(e.value) and "truncated" in str(e.value)


@pytest.mark.parametrize("case", ["missing", "empty", "other", "unfinished", "garbage_index"])
def test_a_folder_that_is_not_a_dump_is_one_line(case, make_recipe, fp32_dump, tmp_path):
    import shutil

    folder = tmp_path / "x"
    if case != "missing":
        folder.mkdir()
    if case == "other":
        (folder / "notes.txt").write_text("hi")
    if case == "unfinished":
        shutil.copytree(fp32_dump, folder, dirs_exist_ok=True)
        (folder / "index.json").unlink()
        (folder / "shard-000000000.safetensors").unlink()
    if case == "garbage_index":
        (folder / "index.json").write_text("{not json")
    with pytest.raises(ConfigError) as e:
        _setup(make_recipe(f"data.offline_dir={folder}"))
    (line,) = e.value.lines()
    assert str(folder) in line
    expected = {
        "missing": "no such folder",
        "empty": "not a supervision dump",
        "other": "not a supervision dump",
        "unfinished": "unfinished dump (3 of 4 shards",
        "garbage_index": "not a readable dump index",
    }[case]
    assert expected in line


@pytest.mark.parametrize(
    "override,field",
    [
        ("model.aux_layer_ids=[1,3,4]", "aux_layer_ids"),
        ("model.dtype=bfloat16", "target_dtype"),
        ("data.max_length=40", "data"),
    ],
)
def test_a_dump_made_for_something_else_is_refused(override, field, make_recipe, fp32_dump):
    with pytest.raises(ConfigError) as e:
        _setup(make_recipe(f"data.offline_dir={fp32_dump}", override))
    (line,) = e.value.lines()
    assert str(fp32_dump) in line and f"({field}: dump has" in line


def test_a_different_target_is_refused(make_recipe, fp32_dump, tmp_path):
    import shutil

    other = tmp_path / "other-target"
    shutil.copytree(make_recipe().model.path, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        _setup(make_recipe(f"data.offline_dir={fp32_dump}", f"model.path={other}"))
    assert "(target: dump has" in e.value.lines()[0]


def test_dump_cli_refuses_a_foreign_folder_in_one_line(make_recipe, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "data.bin").write_bytes(b"1")
    recipe = make_recipe()
    cfg = tmp_path / "r.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    proc = subprocess.run(
        [sys.executable, "-m", "modelopt_ext.dump", "--config", str(cfg), "--out", str(tmp_path / "x")],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert err == [f"error: {tmp_path / 'x'}: not empty and not a dump; choose an empty or new --out folder"]


def test_fuzzed_shard_bytes_never_yield_wrong_data_silently(fp32_dump, tmp_path):
    """Random byte corruption anywhere in a shard: every read gives the original sample or one OfflineError line."""
    import random

    index = od.open_dump(fp32_dump)
    good = od.ShardReader(fp32_dump, index)
    want = [good.read(i) for i in range(3)]
    src = (fp32_dump / "shard-000000000.safetensors").read_bytes()
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "0")))
    for trial in range(int(os.environ.get("FUZZ_TRIALS", "40"))):
        folder = tmp_path / f"f{trial}"
        folder.mkdir()
        data = bytearray(src)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        (folder / "shard-000000000.safetensors").write_bytes(bytes(data))
        reader = od.ShardReader(folder, index)
        for i in range(3):
            try:
                got = reader.read(i)
            except od.OfflineError as e:
                assert "\n" not in str(e) and "shard-000000000.safetensors" in str(e)
                continue
            assert all(torch.equal(got[k], want[i][k]) for k in want[i]), (trial, i)
