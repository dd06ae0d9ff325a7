"""The real trainer streaming from two REAL vLLM servers; one is SIGKILLed mid-run.

`python -m modelopt_ext.train` (tiny recipe, `data.server_urls=[A,B]`, one DataLoader worker) runs until it
has logged a few optimizer steps; then server B's whole process group is killed, with no goodbye. The run
must still exit 0 at `max_steps`, having trained on exactly the samples its schedule prescribes (sample
count, data position AND token count, so a lost, skipped or duplicated conversation shows), log B's
outage by URL, and report per-server stats where B has errors and an outage and A carried the rest.

Uses the session's two servers (tests/streaming/conftest.py); B is left dead, and the next test that asks
for `servers` restarts it. Slow: marked e2e + vllm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO / "recipes" / "eagle3" / "tiny.yaml"
N_CONVERSATIONS = 96
BATCH = 4
MAX_STEPS = 24  # one epoch of the 96 conversations: every sample exactly once
KILL_AFTER_STEP = 4  # B dies once this many steps are logged (well before the end)
PROGRESS_TIMEOUT_S = 600  # startup (imports, tokenising, vocab) + the first steps on a loaded 2-core box
RUN_TIMEOUT_S = 900


def _logged_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if "loss" in rec and "step" in rec:
            steps.append(int(rec["step"]))
    return steps


def _expected_tokens(overrides: list[str]) -> tuple[int, int]:
    """(epoch length, tokens of the first MAX_STEPS*BATCH samples of epoch 0's order) as the trainer sees them."""
    from transformers import AutoTokenizer

    from modelopt_ext.config.recipe import load_recipe
    from modelopt_ext.data.dataset import ConversationDataset
    from modelopt_ext.training.sampler import ResumableShardedSampler

    recipe = load_recipe(TINY_RECIPE, overrides)
    tok = AutoTokenizer.from_pretrained(recipe.model.path)
    ds = ConversationDataset(recipe.data, tok, Path(recipe.data.cache_dir), log=lambda msg: None)
    sampler = ResumableShardedSampler(len(ds), batch_size=BATCH, seed=recipe.training.seed)
    order = sampler.epoch_order(0)[: MAX_STEPS * BATCH]
    return sampler.epoch_length, sum(len(ds[i]["input_ids"]) for i in order)


def test_training_survives_killing_one_vllm_server(servers, tiny_target, tmp_path):
    from modelopt_ext.targets.tiny import write_tiny_conversations

    root, handles = servers
    a, b = handles
    data = write_tiny_conversations(tmp_path / "conversations.jsonl", N_CONVERSATIONS, seed=3)
    out = tmp_path / "run"
    overrides = [
        f"model.path={tiny_target}",
        f"data.path={data}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.server_urls=[{a.url},{b.url}]",
        f"data.shared_storage_root={root}",
        "data.num_workers=1",
        "eagle.ttt_steps=2",
        f"training.output_dir={out}",
        f"training.max_steps={MAX_STEPS}",
        f"training.batch_size={BATCH}",
        "training.warmup_steps=2",
        "training.log_interval=1",
        f"training.save_interval={MAX_STEPS}",
        "training.export_at_end=false",
    ]
    log_path = tmp_path / "train.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelopt_ext.train", "--config", str(TINY_RECIPE), *overrides],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + PROGRESS_TIMEOUT_S
        while len(_logged_steps(out / "metrics.jsonl")) < KILL_AFTER_STEP:
            assert proc.poll() is None, (
                f"training exited early ({proc.returncode}):\n{log_path.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"no {KILL_AFTER_STEP} steps in {PROGRESS_TIMEOUT_S} s"
            time.sleep(0.2)
        killed_at = time.monotonic() - t0
        killed_step = max(_logged_steps(out / "metrics.jsonl"))
        os.killpg(b.process.pid, signal.SIGKILL)  # server B dies mid-run, no goodbye
        b.process.wait(timeout=30)
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    wall = time.monotonic() - t0
    text = log_path.read_text(errors="replace")
    assert rc == 0, f"training failed ({rc}):\n{text[-4000:]}"
    assert killed_step < MAX_STEPS - 4, f"B was killed too late (step {killed_step}) to test failover"

    # Every step ran, on exactly the samples the schedule prescribes: nothing lost, skipped or duplicated.
    assert _logged_steps(out / "metrics.jsonl") == list(range(1, MAX_STEPS + 1))
    ckpts = sorted(out.glob("epoch_*_step_*"))
    assert ckpts, f"no checkpoint in {out}"
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    epoch_length, tokens = _expected_tokens(overrides)
    assert state["global_step"] == MAX_STEPS
    assert state["samples_seen"] == MAX_STEPS * BATCH
    assert state["data_position"] == MAX_STEPS * BATCH <= epoch_length
    assert state["tokens_seen"] == tokens
    report = json.loads((out / "metrics.json").read_text())
    assert report["steps"] == MAX_STEPS and report["samples"] == MAX_STEPS * BATCH

    # The outage is logged, naming B; A never left rotation.
    assert f"hidden-state server {b.url} taken out of rotation" in text
    assert f"hidden-state server {a.url} taken out of rotation" not in text

    # Per-server stats: B failed and went down once; A served everything after the kill.
    stats = report["servers"]
    sa, sb = stats[a.url], stats[b.url]
    print(
        f"\n{MAX_STEPS} steps x {BATCH} over 2 vLLM servers; B killed after step {killed_step} "
        f"({killed_at:.0f} s); done in {wall:.0f} s; servers: {json.dumps(stats)}"
    )
    assert sb["errors"] >= 1 and sb["down_events"] >= 1
    assert sa["errors"] == 0 and sa["down_events"] == 0
    ok_a, ok_b = sa["requests"] - sa["errors"], sb["requests"] - sb["errors"]
    # Both carried load before the kill; A alone afterwards, so A delivered most samples.
    assert ok_b >= 1 and ok_a > ok_b
    # The run is exactly one epoch, so the loader asks for each sample once: one successful fetch per sample.
    assert ok_a + ok_b == MAX_STEPS * BATCH
