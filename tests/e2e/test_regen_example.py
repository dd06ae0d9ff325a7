"""The regeneration task of `examples/local/regen_eagle3.yaml` against a real vLLM OpenAI server (CPU build):
every assistant turn rewritten by the tiny target, order and ids kept, the summary written. The training and
benchmark tasks after it are the quickstart's (tests/e2e/test_quickstart.py), so they are skipped here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1800)
def test_regen_example_rewrites_the_assistant_turns_with_real_vllm(tmp_path):
    env = dict(os.environ, MODELOPT_JOB_DIR=str(tmp_path))
    r = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "--yaml",
            "examples/local/regen_eagle3.yaml",
            "--run-id",
            "t",
            "pipeline.task_3.skip=true",
            "pipeline.task_4.skip=true",
        ],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    out = (r.stdout + r.stderr).replace("\r", "")
    assert r.returncode == 0, out[-8000:]
    scratch = tmp_path / "regen_eagle3" / "t" / "scratch"
    before = [json.loads(x) for x in (scratch / "conversations.jsonl").read_text().splitlines()]
    after = [json.loads(x) for x in (scratch / "regenerated.jsonl").read_text().splitlines()]
    assert [a.get("id") for a in after] == [b.get("id") for b in before] and len(after) == 200
    changed = turns = 0
    for b, a in zip(before, after, strict=True):
        key = "messages" if "messages" in b else "conversations"
        assert len(a[key]) == len(b[key])
        for mb, ma in zip(b[key], a[key], strict=True):
            text_b, text_a = mb.get("content", mb.get("value")), ma.get("content", ma.get("value"))
            if mb.get("role", mb.get("from")) in ("assistant", "gpt"):
                turns += 1
                changed += text_a.strip() != text_b.strip()
                assert text_a.strip()
            else:
                assert text_a == text_b  # user and system turns untouched
    summary = json.loads((scratch / "regenerated.jsonl.summary.json").read_text())
    assert summary["assistant_turns"] == turns and summary["failures"] == 0 and summary["complete"]
    assert 0 < changed < turns  # the target's own answers: some differ from the data (greedy, fitted target)
    assert "regenerate: done: 200 conversations" in out
