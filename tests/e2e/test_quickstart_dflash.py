"""The DFlash quickstart as docs/dflash.md shows it: `uv run launch.py --yaml examples/local/quickstart_dflash.yaml`.

One run of the real thing (local executor, tiny target built or reused, a real vLLM hidden-state server (CPU
build) capturing the DFlash drafter's layers next to the trainer, streamed training, export in the engines'
DFlash format, acceptance measured by the trainer's simulation, specdec_bench (one forward per block) and
vLLM's own engine running `method: dflash` on the export, gated, summary).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BLOCK = 8  # recipes/dflash/tiny.yaml


@pytest.mark.timeout(2400)
def test_dflash_quickstart_end_to_end(tmp_path):
    start = time.monotonic()
    env = dict(os.environ, MODELOPT_JOB_DIR=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "launch.py", "--yaml", "examples/local/quickstart_dflash.yaml", "--run-id", "first"],
        cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    print(f"[quickstart_dflash] {time.monotonic() - start:.0f}s")

    scratch = tmp_path / "quickstart_dflash" / "first" / "scratch"
    export = scratch / "dflash" / "export"
    from modelopt_ext.deploy.export import check_export

    cfg = check_export(export)  # the strict check vLLM's and SGLang's loaders need
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["dflash_config"]["block_size"] == BLOCK
    assert cfg["dflash_config"]["target_layer_ids"] == [0, 1, 2]  # the recipe's vLLM ids [1, 2, 3] - 1
    rdv = next((scratch / "rendezvous").iterdir())
    assert (rdv / "logs" / "vllm.0.log").is_file() and (rdv / "done").is_file()
    assert "mode streaming" in out  # the trainer streamed the drafter's layers from the vLLM server

    summary = (scratch / "dflash" / "job_summary.txt").read_text()
    k = BLOCK - 1  # every measurement drafts the whole block: the drafter's own draft length
    assert f"drafter (export, loads in vLLM/SGLang): {export}" in summary
    assert re.search(
        rf"acceptance length \(trainer simulation, step 120, training data, k={k}\): [0-9.]+", summary
    )
    bench = re.search(rf"acceptance length \(specdec_bench.*, k={k}\): ([0-9.]+)", summary)
    engine = re.search(rf"acceptance length \(vLLM [0-9.]+ cpu, 8 prompts, k={k}\): ([0-9.]+)", summary)
    assert bench and float(bench.group(1)) > 1.2, summary  # well above an untrained drafter's ~1.0
    assert engine and float(engine.group(1)) > 1.2, summary
    assert re.search(r"gate passed: vLLM [0-9.]+ cpu [0-9.]+ vs specdec_bench", summary), summary
    # vLLM's DFlash and ours draft the same blocks: the same acceptance, position by position.
    rec = json.loads((scratch / "acceptance_vllm.json").read_text())
    ref = json.loads((scratch / "specdec_bench.json").read_text())
    assert rec["num_draft_tokens"] == k * rec["num_drafts"]
    rates = [c / rec["num_drafts"] for c in rec["accepted_per_position"]]
    assert rates == pytest.approx(ref["acceptance_per_position"], abs=0.05), (
        rates,
        ref["acceptance_per_position"],
    )
    assert "python -m modelopt_ext.serve_vllm --target" in summary and "serve_sglang" in summary
    printed = out.replace("\r", "")
    for line in summary.splitlines():  # printed, not only written
        assert line in printed, line
