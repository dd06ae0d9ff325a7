"""Training from a dump: an fp32 dump trains exactly like the colocated target (same losses, step by step),
and hybrid mode streams each sample once in the first epoch, writes it to the dump, and reads it back later
(the servers may be gone), with exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelopt_ext.training.dump import dump_supervision
from modelopt_ext.training.trainer import train

pytestmark = pytest.mark.e2e

STEPS = ["training.log_interval=1", "training.warmup_steps=1", "training.export_at_end=false"]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def test_fp32_dump_trains_exactly_like_colocated(make_recipe, tmp_path):
    common = ["training.batch_size=1", "training.max_steps=6", "training.save_interval=6", *STEPS]
    dump_supervision(
        make_recipe(), tmp_path / "dump", dtype="float32", samples_per_shard=4, log=lambda m: None
    )
    colocated = train(make_recipe(*common, f"training.output_dir={tmp_path / 'c'}"))
    offline = train(
        make_recipe(*common, f"training.output_dir={tmp_path / 'o'}", f"data.offline_dir={tmp_path / 'dump'}")
    )
    lc, lo = _losses(tmp_path / "c"), _losses(tmp_path / "o")
    assert len(lc) == 6 and lc == lo
    assert colocated.metrics == offline.metrics


@pytest.mark.parametrize("workers", [0, 2])
def test_hybrid_streams_the_first_epoch_once_then_reads_the_dump(make_recipe, tmp_path, workers):
    from fake_vllm import FakeVllmServer

    server = FakeVllmServer(str(tmp_path / "hs"), n_layers=4, hidden=128).start()
    (tmp_path / "hs").mkdir(exist_ok=True)
    dump = tmp_path / "dump"
    # 10 samples, batch 2: 5 steps per epoch. Stop after epoch 0 + 1 step, with the server gone after epoch 0.
    base = [
        f"data.server_urls=[{server.url}]",
        f"data.offline_dir={dump}",
        f"training.output_dir={tmp_path / 'h'}",
        "training.batch_size=2",
        "training.epochs=2",
        f"data.num_workers={workers}",
        "training.save_interval=5",
        *STEPS,
    ]
    first = train(make_recipe(*base, "training.max_steps=5"))
    assert first.global_step == 5
    assert server.completions == 10  # each sample fetched exactly once
    assert len(list(dump.glob("shard-*.safetensors"))) == 10
    server.kill()
    second = train(make_recipe(*base, "training.max_steps=10"), resume="auto")
    assert second.global_step == 10 and server.completions == 10
    assert (dump / "index.json").is_file()  # the resumed run found the dump complete
    # the dump is now a plain offline dump: train from it with no servers at all
    offline = make_recipe(
        f"data.offline_dir={dump}", f"training.output_dir={tmp_path / 'o'}", "training.max_steps=2"
    )
    assert train(offline).global_step == 2
