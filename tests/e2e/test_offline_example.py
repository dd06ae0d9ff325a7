"""`examples/local/offline_eagle3.yaml` as a user runs it: a real vLLM hidden-state server (CPU build) and
`python -m modelopt_ext.dump` beside it fill a dump, two epochs train from the dump alone, export, benchmark."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(2400)
def test_offline_example_dumps_from_vllm_then_trains_two_epochs_from_disk(tmp_path):
    env = dict(os.environ, MODELOPT_JOB_DIR=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "launch.py", "--yaml", "examples/local/offline_eagle3.yaml", "--run-id", "t"],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=2000,
    )
    out = (r.stdout + r.stderr).replace("\r", "")
    assert r.returncode == 0, out[-8000:]
    scratch = tmp_path / "offline_eagle3" / "t" / "scratch"
    index = json.loads((scratch / "dump" / "supervision" / "index.json").read_text())
    assert index["num_samples"] == 400 and index["storage_dtype"] == "bfloat16"
    assert index["aux_layer_ids"] == [1, 2, 3] and index["target_form"] == "target_last_hidden"
    assert "streaming source" in out and re.search(r"dump: complete: 400 samples", out)
    # training read the dump only: offline mode, two epochs of 400 samples at batch 8 = 100 steps
    assert "mode offline" in out
    state = json.loads((scratch / "eagle3" / "epoch_1_step_100" / "trainer_state.json").read_text())
    assert state["global_step"] == 100 and state["epoch"] == 1
    assert (scratch / "eagle3" / "export" / "config.json").is_file()
    m = re.search(r"acceptance length \(specdec_bench.*\): ([0-9.]+)", out)
    assert m and float(m.group(1)) > 1.0, out[-4000:]
