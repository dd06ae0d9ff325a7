"""serve_vllm / serve_sglang for a DFlash drafter: the flags come from the drafter with the block size read from
its config (vLLM `method: dflash`, num_speculative_tokens = B-1; SGLang DFLASH with B draft tokens), a length
it was not trained for is refused in one line, --print-only writes nothing, SGLang loads our export as is."""

from __future__ import annotations

import importlib.util
import json
import shlex

import pytest

from modelopt_ext import serve_sglang, serve_vllm
from modelopt_ext.deploy.export import export_checkpoint

from .test_dflash_export import BLOCK, make_dflash_checkpoint

TARGET = "Qwen/Qwen3-8B"


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def printed(capsys, module, argv):
    assert module.main(argv) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.strip().splitlines()
    argv = shlex.split(lines[-1])
    return [a for a in argv if not ("=" in a and a.split("=")[0].isupper())], lines[:-1]


def flag(argv, name):
    return argv[argv.index(name) + 1]


def one_line_error(capsys, module, argv, says):
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


@pytest.fixture()
def ckpt(tmp_path):
    return make_dflash_checkpoint(tmp_path / "run")[0]


def test_vllm_print_only_for_a_checkpoint_and_an_export(ckpt, tmp_path, capsys):
    before = tree(tmp_path)
    argv, notes = printed(
        capsys, serve_vllm, ["--target", TARGET, "--draft", str(ckpt), "--flavor", "cpu", "--print-only"]
    )
    assert tree(tmp_path) == before  # nothing exported, nothing built
    assert json.loads(flag(argv, "--speculative-config")) == {
        "method": "dflash",
        "model": str(ckpt.parent / f"{ckpt.name}-hf"),
        "num_speculative_tokens": BLOCK - 1,  # read from the checkpoint's config: vLLM drafts the B-1 masks
    }
    assert any("not done: --print-only" in n for n in notes)

    out = export_checkpoint(ckpt, tmp_path / "drafter")
    argv, notes = printed(
        capsys, serve_vllm,
        ["--target", TARGET, "--draft", str(out), "--num-speculative-tokens", str(BLOCK - 1), "--flavor", "gpu",
         "--python", "/opt/vllm/bin/python", "--print-only"],
    )  # fmt: skip
    assert json.loads(flag(argv, "--speculative-config")) == {
        "method": "dflash", "model": str(out), "num_speculative_tokens": BLOCK - 1,
    }  # fmt: skip
    assert notes == []  # our export pins every field: nothing left to the engine's defaults


def test_vllm_refuses_a_draft_length_the_block_was_not_trained_for(ckpt, capsys):
    one_line_error(
        capsys, serve_vllm, ["--target", TARGET, "--draft", str(ckpt), "--num-speculative-tokens", "7", "--print-only"],
        f"block size {BLOCK} drafts {BLOCK - 1} tokens per round",
    )  # fmt: skip


def test_vllm_hub_dflash_needs_its_length(capsys):
    one_line_error(
        capsys, serve_vllm, ["--target", TARGET, "--draft", "z-lab/Qwen3-8B-DFlash-b16", "--drafter", "dflash",
                             "--print-only"], "pass --num-speculative-tokens",
    )  # fmt: skip
    argv, _ = printed(
        capsys, serve_vllm, ["--target", TARGET, "--draft", "z-lab/Qwen3-8B-DFlash-b16", "--drafter", "dflash",
                             "--num-speculative-tokens", "15", "--print-only"],
    )  # fmt: skip
    assert json.loads(flag(argv, "--speculative-config"))["method"] == "dflash"


def test_vllm_notes_the_fields_a_foreign_export_leaves_to_defaults(ckpt, tmp_path, capsys):
    out = export_checkpoint(ckpt, tmp_path / "zlab_like")
    cfg = json.loads((out / "config.json").read_text())
    for k in ("num_target_layers", "rope_parameters"):
        cfg.pop(k)
    cfg["dflash_config"] = {k: cfg["dflash_config"][k] for k in ("mask_token_id", "target_layer_ids")}
    (out / "config.json").write_text(json.dumps(cfg))
    argv, notes = printed(capsys, serve_vllm, ["--target", TARGET, "--draft", str(out), "--print-only"])
    assert (
        json.loads(flag(argv, "--speculative-config"))["num_speculative_tokens"] == BLOCK - 1
    )  # top-level B
    assert len(notes) == 1 and "dflash_config.causal" in notes[0] and "num_target_layers" in notes[0]


def test_sglang_print_only_for_a_checkpoint_and_an_export(ckpt, tmp_path, capsys, monkeypatch):
    before = tree(tmp_path)
    argv, _ = printed(capsys, serve_sglang, ["--target", TARGET, "--draft", str(ckpt), "--print-only"])
    assert tree(tmp_path) == before
    sibling = ckpt.parent / f"{ckpt.name}-hf"
    assert flag(argv, "--speculative-algorithm") == "DFLASH"
    assert flag(argv, "--speculative-draft-model-path") == str(sibling)  # our export, loaded as is
    assert flag(argv, "--speculative-num-draft-tokens") == str(BLOCK)  # SGLang counts the whole block
    for eagle_only in ("--speculative-num-steps", "--speculative-eagle-topk", "--speculative-token-map"):
        assert eagle_only not in argv

    # For real (sglang "installed", exec captured): the export is written, no SGLang copy is needed.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "sglang" else None)
    execs = []
    monkeypatch.setattr(serve_sglang.os, "execvp", lambda f, a: execs.append(a))
    assert serve_sglang.main(["--target", TARGET, "--draft", str(ckpt)]) == 0
    assert (sibling / "model.safetensors").is_file() and not (ckpt.parent / f"{sibling.name}-sglang").exists()
    assert flag(execs[0], "--speculative-num-draft-tokens") == str(BLOCK)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--num-draft-tokens", "8"], f"takes --num-draft-tokens {BLOCK}"),
        (["--num-steps", "3"], "--num-steps and --topk do not apply"),
        (["--algorithm", "EAGLE3"], "SGLang serves a dflash drafter with DFLASH"),
    ],
    ids=["wrong-block", "eagle-steps", "eagle-algorithm"],
)
def test_sglang_refuses_eagle_flags_and_other_block_sizes(ckpt, capsys, extra, says):
    one_line_error(
        capsys, serve_sglang, ["--target", TARGET, "--draft", str(ckpt), *extra, "--print-only"], says
    )
