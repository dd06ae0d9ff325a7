"""The acceptance gate's decisions and the summary lines (logic only; the real-engine contract is
tests/vllm/test_acceptance_gate.py)."""

from __future__ import annotations

import json
import sys

import pytest

from modelopt_ext import job_summary
from modelopt_ext.acceptance import engines
from modelopt_ext.acceptance.gate import acceptance_lines, gate, simulated_acceptance

TRAINER = {"step": 80, "acc_0": 0.8, "acc_1": 0.5, "acc_2": 0.5, "acc_3": 0.9}
BENCH = {
    "num_prompts": 8,
    "num_steps": 3,
    "mean_acceptance_length": 2.0,
    "prompt_set": "eval.jsonl (8 prompts)",
}


def vllm(value, **kw):
    return {"engine": "vllm", "engine_version": "0.32.0", "engine_build": "cpu", "num_prompts": 8,
            "num_steps": 3, "mean_acceptance_length": value, **kw}  # fmt: skip


def test_simulated_acceptance_is_the_greedy_chain_expectation():
    value, n = simulated_acceptance(TRAINER, 3)
    assert n == 3 and value == pytest.approx(1 + 0.8 + 0.4 + 0.2)
    assert simulated_acceptance({"acc_0": 0.5}, 3) == (1.5, 1)
    assert simulated_acceptance({"loss": 1.0}, 3) is None


def test_lines_name_their_source():
    lines = acceptance_lines(TRAINER, BENCH, [vllm(2.41), {"engine": "sglang", "skipped": "not installed"}])
    assert lines[0] == "acceptance length (trainer simulation, step 80, training data, k=3): 2.40"
    assert lines[1] == "acceptance length (specdec_bench, eval.jsonl (8 prompts), k=3): 2.00"
    assert lines[2] == "acceptance length (vLLM 0.32.0 cpu, 8 prompts, k=3): 2.41"
    assert lines[3] == "acceptance length (SGLang): skipped: not installed"
    sampled = {**vllm(2.0), "sampled": {"temperature": 0.7, "top_p": 0.9, "mean_acceptance_length": 1.8}}
    assert "acceptance length (vLLM 0.32.0 cpu, T=0.7, top-p=0.9, 8 prompts, k=3): 1.80" in acceptance_lines(
        None, None, [sampled]
    )


@pytest.mark.parametrize(
    ("engine_value", "threshold", "ok"),
    [
        (2.0, 0.1, True),
        (1.81, 0.1, True),
        (1.79, 0.1, False),
        (1.79, 0.15, True),
        (2.6, 0.1, True),
        (1.0, 0.1, False),
    ],
)
def test_gate_threshold(engine_value, threshold, ok):
    verdicts = gate(TRAINER, BENCH, [vllm(engine_value)], threshold)
    engine_verdicts = [v for v in verdicts if "vLLM" in v.line]
    assert len(engine_verdicts) == 1 and engine_verdicts[0].ok is ok
    if not ok:
        line = engine_verdicts[0].line
        assert line.startswith("gate FAILED: vLLM 0.32.0 cpu") and "vs specdec_bench 2.00" in line
        assert "export" in line and "d2t" in line and "aux hidden-state layer ids" in line
        assert "\n" not in line


def test_gate_engine_error_skip_and_mismatch():
    err = gate(None, BENCH, [{"engine": "vllm", "error": "ValueError: no parameter named x"}])
    assert [v.ok for v in err] == [False] and "could not run the exported drafter" in err[0].line
    skipped = gate(None, BENCH, [{"engine": "sglang", "skipped": "not installed"}])
    assert [v.ok for v in skipped] == [True] and "no serving engine measured" in skipped[0].line
    other_k = gate(None, BENCH, [vllm(2.0, num_steps=4)])
    assert [v.ok for v in other_k] == [False] and "not comparable" in other_k[0].line
    assert not gate(None, None, [vllm(2.0)])[0].ok
    with pytest.raises(ValueError, match="threshold"):
        gate(None, BENCH, [], 1.5)


def test_trainer_far_above_reference_is_a_note_not_a_failure():
    high = {"step": 9, "acc_0": 1.0, "acc_1": 1.0, "acc_2": 1.0}  # sim 4.0 vs specdec 2.0
    verdicts = gate(high, BENCH, [vllm(2.0)])
    assert all(v.ok for v in verdicts)
    assert verdicts[0].line.startswith("note: specdec_bench 2.00 is 50% below the trainer's simulation 4.00")


def _job(tmp_path):
    out = tmp_path / "out"
    (out / "export").mkdir(parents=True)
    (out / "export" / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text(json.dumps(TRAINER) + "\n")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH))
    return out, bench


def test_job_summary_prints_all_three_and_fails_on_the_gate(tmp_path, capsys):
    out, bench = _job(tmp_path)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(vllm(1.95)))
    bad.write_text(json.dumps(vllm(1.05)))
    base = ["--output", str(out), "--target", "T", "--bench", str(bench), "--write", str(tmp_path / "s.txt")]
    assert job_summary.main([*base, "--engine", str(good)]) == 0
    text = capsys.readouterr().out
    for src in ("trainer simulation", "specdec_bench", "vLLM 0.32.0 cpu"):
        assert f"acceptance length ({src}" in text
    assert "gate passed: vLLM 0.32.0 cpu 1.95 vs specdec_bench 2.00" in text
    assert job_summary.main([*base, "--engine", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "gate FAILED" in (tmp_path / "s.txt").read_text()  # written before failing
    assert captured.err.count("\n") == 1 and captured.err.startswith("gate FAILED: vLLM")
    assert job_summary.main([*base, "--engine", str(bad), "--gate-threshold", "0.5"]) == 0
    assert job_summary.main([*base, "--engine", str(tmp_path / "missing.json")]) == 2


def test_sglang_not_installed_is_a_skipped_record(tmp_path, capsys):
    rec = tmp_path / "sglang.json"
    rc = engines.main(["--engine", "sglang", "--target", "T", "--draft", "D", "--prompts", "P", "--json", str(rec),
                       "--sglang-python", sys.executable])  # fmt: skip
    assert rc == 0
    r = json.loads(rec.read_text())
    assert r["engine"] == "sglang" and "not installed" in r["skipped"]
    assert "acceptance length (SGLang): skipped: sglang is not installed" in capsys.readouterr().out


def test_limit_is_a_deprecated_alias_of_max_prompts(capsys):
    import argparse

    from modelopt_ext.acceptance.prompts import add_max_prompts_option

    p = argparse.ArgumentParser()
    add_max_prompts_option(p)
    assert p.parse_args(["--max-prompts", "4"]).max_prompts == 4
    assert "deprecated" not in capsys.readouterr().err
    assert p.parse_args(["--limit", "5"]).max_prompts == 5
    assert "warning: --limit is deprecated; use --max-prompts" in capsys.readouterr().err


def test_sampled_disagreement_with_greedy_agreeing_is_a_note():
    s = {"temperature": 0.7, "top_p": 0.95}
    bench = {**BENCH, "sampled": {**s, "mean_acceptance_length": 1.9}}
    rec = {**vllm(2.0), "sampled": {**s, "mean_acceptance_length": 1.03}}
    verdicts = gate(None, bench, [rec])
    assert all(v.ok for v in verdicts) and len(verdicts) == 2
    assert verdicts[1].line.startswith(
        "note: at T=0.7, top-p=0.95 vLLM 0.32.0 cpu 1.03 vs specdec_bench 1.90"
    )
    assert "the export is fine" in verdicts[1].line
    close = {**vllm(2.0), "sampled": {**s, "mean_acceptance_length": 1.85}}
    assert len(gate(None, bench, [close])) == 1


def test_engine_that_cannot_take_the_export_writes_an_error_record(tmp_path, capsys):
    """A folder vLLM would misread (no top-level aux ids) is refused before any engine start, and the
    refusal is a record the gate fails on, not a crash of the benchmark task."""
    draft = tmp_path / "export"
    draft.mkdir()
    (draft / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    rec = tmp_path / "vllm.json"
    rc = engines.main(["--engine", "vllm", "--target", str(tmp_path), "--draft", str(draft), "--prompts",
                       str(prompts), "--limit", "1", "--json", str(rec)])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 1 and "warning: --limit is deprecated; use --max-prompts" in cap.err
    r = json.loads(rec.read_text())
    assert r["engine"] == "vllm" and "eagle_aux_hidden_state_layer_ids" in r["error"]
    assert "acceptance length (vLLM): FAILED to run the export" in cap.out
    [verdict] = gate(None, BENCH, [r])
    assert not verdict.ok and verdict.line.startswith("gate FAILED: vLLM could not run the exported drafter")
    assert engines.main(["--engine", "vllm", "--target", "t", "--draft", "d", "--prompts", "p",
                         "--max-new-tokens", "0", "--json", str(rec)]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip() == "error: --max-new-tokens must be >= 1"
