"""The README's first command on this machine: `uv run launch.py --yaml examples/local/quickstart.yaml`.

One run of the real thing (local executor, tiny target built or reused, a real vLLM hidden-state server
(CPU build) next to the trainer on one node, streaming training, export, acceptance measured three ways
(trainer simulation, specdec_bench, vLLM's own engine on the export) and gated, summary), then a
second run of the preparation task alone to check that it reuses the target, the tokenisation cache and
vLLM's environment and says so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _launch(job_dir: Path, run_id: str, *overrides: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, MODELOPT_JOB_DIR=str(job_dir))
    return subprocess.run(
        [
            sys.executable,
            "launch.py",
            "--yaml",
            "examples/local/quickstart.yaml",
            "--run-id",
            run_id,
            *overrides,
        ],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(2400)
def test_quickstart_end_to_end_and_reuse(tmp_path):
    start = time.monotonic()
    r = _launch(tmp_path, "first", timeout=1500)
    took = time.monotonic() - start
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    print(f"[quickstart] first run {took:.0f}s")

    scratch = tmp_path / "quickstart" / "first" / "scratch"
    export = scratch / "eagle3" / "export"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    # The server next to the trainer was vLLM, and the trainer streamed from it.
    rdv = next((scratch / "rendezvous").iterdir())
    assert (rdv / "logs" / "vllm.0.log").is_file() and (rdv / "done").is_file()
    assert "mode streaming" in out
    summary = (scratch / "eagle3" / "job_summary.txt").read_text()
    assert f"drafter (export, loads in vLLM/SGLang): {export}" in summary
    m = re.search(r"acceptance length \(specdec_bench.*\): ([0-9.]+)", summary)
    assert m and float(m.group(1)) > 1.0, summary
    # The three layers of the chain, one line each naming its source, and the gate between the last two.
    assert re.search(
        r"acceptance length \(trainer simulation, step 80, training data, k=3\): [0-9.]+", summary
    )
    m = re.search(r"acceptance length \(vLLM [0-9.]+ cpu, 8 prompts, k=3\): ([0-9.]+)", summary)
    assert m and float(m.group(1)) > 1.0, summary
    assert "acceptance length (SGLang): skipped: sglang is not installed" in summary
    assert re.search(r"gate passed: vLLM [0-9.]+ cpu [0-9.]+ vs specdec_bench", summary), summary
    assert re.search(r"training throughput: [0-9.]+ samples/s", summary)
    assert "python -m modelopt_ext.serve_vllm --target" in summary and "serve_sglang" in summary
    printed = out.replace("\r", "")
    for (
        line
    ) in summary.splitlines():  # printed (the launcher echoes task output as "  | <line>"), not only written
        assert line in printed, line

    # A second run reuses what the first built (only the preparation task: it decides what is reused).
    r2 = _launch(tmp_path, "second", "pipeline.task_1.skip=true", "pipeline.task_2.skip=true", timeout=600)
    out2 = r2.stdout + r2.stderr
    assert r2.returncode == 0, out2[-4000:]
    for what in ("reused: tiny target", "reused: tokenisation cache", "reused: vLLM environment"):
        assert what in out2, out2[-4000:]
