"""serve_sglang / serve_vllm: argv for each --draft kind, print-only writes nothing, P-EAGLE refused,
a missing sglang gives an install hint and exit 2 (sglang is not installable on this machine)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelopt_ext import serve_sglang, serve_vllm
from modelopt_ext.data.draft_vocab import DraftVocab
from modelopt_ext.deploy.export import export_checkpoint

from .conftest import DRAFT_VOCAB

TARGET = "Qwen/Qwen3-8B"


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def printed_argv(capsys, argv, module=serve_sglang):
    assert module.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return shlex.split(out[-1]), out[:-1]


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_sglang_checkpoint_is_exported_to_a_sibling(checkpoint, tmp_path, capsys, monkeypatch):
    ckpt, _ = checkpoint
    before = tree(tmp_path)
    argv, notes = printed_argv(capsys, ["--target", TARGET, "--draft", str(ckpt), "--print-only"])
    assert tree(tmp_path) == before  # --print-only writes nothing
    sibling = ckpt.parent / f"{ckpt.name}-hf"
    sglang_dir = ckpt.parent / f"{ckpt.name}-hf-sglang"
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert flag(argv, "--model-path") == TARGET
    assert flag(argv, "--speculative-algorithm") == "EAGLE3"
    assert flag(argv, "--speculative-draft-model-path") == str(sglang_dir)
    assert (flag(argv, "--speculative-num-steps"), flag(argv, "--speculative-eagle-topk")) == ("3", "1")
    assert flag(argv, "--speculative-num-draft-tokens") == "4"
    assert "--speculative-token-map" not in argv  # the export carries d2t: SGLang derives the map
    assert any("not done: --print-only" in n for n in notes)

    # For real (sglang "installed", exec captured): the export is written, then SGLang is exec'd.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "sglang" else None)
    execs = []
    monkeypatch.setattr(serve_sglang.os, "execvp", lambda f, a: execs.append(a))
    assert (
        serve_sglang.main(
            [
                "--target",
                TARGET,
                "--draft",
                str(ckpt),
                "--port",
                "31000",
                "--",
                "--mem-fraction-static",
                "0.8",
            ]
        )
        == 0
    )
    exported = load_file(str(sibling / "model.safetensors"))
    assert "d2t" in exported and "layers.0.mlp.up_proj.weight" in exported  # the vLLM-ready export
    served = load_file(str(sglang_dir / "model.safetensors"))
    assert sorted(served) == sorted(k.replace("layers.0.", "midlayer.") for k in exported)
    assert torch.equal(served["midlayer.mlp.up_proj.weight"], exported["layers.0.mlp.up_proj.weight"])
    assert json.loads((sglang_dir / "config.json").read_text())["num_hidden_layers"] == 1
    assert flag(execs[0], "--port") == "31000" and execs[0][-2:] == ["--mem-fraction-static", "0.8"]


def test_sglang_export_folder(checkpoint, tmp_path, capsys):
    out = export_checkpoint(checkpoint[0], tmp_path / "drafter")
    before = tree(tmp_path)
    argv, notes = printed_argv(
        capsys, ["--target", TARGET, "--draft", str(out), "--tp-size", "2", "--print-only"]
    )
    assert tree(tmp_path) == before
    assert flag(argv, "--speculative-draft-model-path") == str(tmp_path / "drafter-sglang")  # midlayer copy
    assert flag(argv, "--tp-size") == "2" and any("midlayer" in n for n in notes)
    argv, _ = printed_argv(
        capsys, ["--target", TARGET, "--draft", str(out), "--layer-name", "layers.0", "--print-only"]
    )
    assert flag(argv, "--speculative-draft-model-path") == str(out)  # nothing to change: used as is


def test_sglang_hub_id_passed_through(capsys):
    argv, notes = printed_argv(capsys, ["--target", TARGET, "--draft", "org/some-eagle3", "--print-only"])
    assert flag(argv, "--speculative-draft-model-path") == "org/some-eagle3"
    assert any("hub id" in n for n in notes)


def _old_style_export(checkpoint, tmp_path):
    """An export from another tool: generic architecture, the target's layer count, no d2t in the weights."""
    out = export_checkpoint(checkpoint[0], tmp_path / "old")
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], num_hidden_layers=4)
    (out / "config.json").write_text(json.dumps(cfg))
    w = load_file(str(out / "model.safetensors"))
    w.pop("d2t")
    save_file(w, str(out / "model.safetensors"))
    return out


def test_sglang_rewrites_config_and_regenerates_the_token_map(checkpoint, tmp_path, capsys, monkeypatch):
    out = _old_style_export(checkpoint, tmp_path)
    before = tree(tmp_path)
    argv, _ = printed_argv(capsys, ["--target", TARGET, "--draft", str(out), "--print-only"])
    assert tree(tmp_path) == before
    copy = tmp_path / "old-sglang"
    assert flag(argv, "--speculative-draft-model-path") == str(copy)
    assert flag(argv, "--speculative-token-map") == str(copy / "sglang_token_map.pt")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "sglang" else None)
    monkeypatch.setattr(serve_sglang.os, "execvp", lambda f, a: None)
    assert serve_sglang.main(["--target", TARGET, "--draft", str(out)]) == 0
    cfg = json.loads((copy / "config.json").read_text())
    assert "midlayer.self_attn.q_proj.weight" in load_file(str(copy / "model.safetensors"))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert (
        json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    )  # the original is untouched
    ids = torch.load(copy / "sglang_token_map.pt", weights_only=True)
    assert ids.dtype == torch.int64 and torch.equal(ids, DraftVocab.load(out).selected_ids)
    assert ids.numel() == DRAFT_VOCAB


def test_sglang_reduced_vocab_without_any_mapping_is_refused(checkpoint, tmp_path, capsys):
    out = _old_style_export(checkpoint, tmp_path)
    (out / "vocab_mapping.safetensors").unlink()
    assert serve_sglang.main(["--target", TARGET, "--draft", str(out), "--print-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no d2t, vocab_mapping.safetensors or t2d" in err


@pytest.mark.parametrize("how", ["config", "weights"])
def test_sglang_refuses_a_parallel_drafting_head(checkpoint, tmp_path, capsys, how):
    out = export_checkpoint(checkpoint[0], tmp_path / "pe")
    if how == "config":
        cfg = json.loads((out / "config.json").read_text())
        cfg["parallel_drafting"] = True
        (out / "config.json").write_text(json.dumps(cfg))
    else:
        w = load_file(str(out / "model.safetensors"))
        w["mask_hidden"] = torch.zeros(1, 192)
        save_file(w, str(out / "model.safetensors"))
    assert serve_sglang.main(["--target", TARGET, "--draft", str(out), "--print-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "P-EAGLE" in err and "serve_vllm" in err


def test_sglang_missing_gives_an_install_hint_and_exit_2(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    assert importlib.util.find_spec("sglang") is None  # this machine cannot have it
    before = tree(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "modelopt_ext.serve_sglang", "--target", TARGET, "--draft", str(ckpt)],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "sglang is not installed" in r.stderr and "pip install" in r.stderr
    assert tree(tmp_path) == before  # nothing exported when it cannot run


def test_sglang_bad_inputs_are_one_line(tmp_path, capsys):
    assert serve_sglang.main(["--target", TARGET, "--draft", str(tmp_path / "nope"), "--print-only"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert (
        serve_sglang.main(["--target", TARGET, "--draft", "org/x", "--num-draft-tokens", "8", "--print-only"])
        == 2
    )
    assert "--num-steps + 1 = 4" in capsys.readouterr().err


def test_vllm_argv_for_checkpoint_and_export(checkpoint, tmp_path, capsys, monkeypatch):
    ckpt, _ = checkpoint
    monkeypatch.delenv("MODELOPT_EXT_VLLM_PYTHON", raising=False)
    before = tree(tmp_path)
    argv, _ = printed_argv(
        capsys,
        ["--target", "outputs/tiny/target", "--draft", str(ckpt), "--flavor", "cpu", "--print-only"],
        serve_vllm,
    )
    assert tree(tmp_path) == before
    env_prefix = [a for a in argv if "=" in a and a.split("=")[0].isupper()]
    assert env_prefix == ["VLLM_CPU_KVCACHE_SPACE=1"] or "VLLM_CPU_KVCACHE_SPACE" in __import__("os").environ
    argv = argv[len(env_prefix) :]
    assert argv[0].endswith("/bin/python") and argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--model") == "outputs/tiny/target" and "--enforce-eager" in argv
    spec = json.loads(flag(argv, "--speculative-config"))
    assert spec == {
        "method": "eagle3",
        "model": str(ckpt.parent / f"{ckpt.name}-hf"),
        "num_speculative_tokens": 3,
    }

    out = export_checkpoint(ckpt, tmp_path / "drafter")
    argv, _ = printed_argv(
        capsys,
        ["--target", "T", "--draft", str(out), "--num-speculative-tokens", "5", "--flavor", "gpu", "--python",
         "/opt/vllm/bin/python", "--print-only", "--", "--max-num-seqs", "8"],
        serve_vllm,
    )  # fmt: skip
    assert argv[0] == "/opt/vllm/bin/python" and "--enforce-eager" not in argv
    assert json.loads(flag(argv, "--speculative-config"))["num_speculative_tokens"] == 5
    assert json.loads(flag(argv, "--speculative-config"))["model"] == str(out)
    assert argv[-2:] == ["--max-num-seqs", "8"]


def test_vllm_exec_exports_the_checkpoint_first(checkpoint, monkeypatch):
    ckpt, _ = checkpoint
    execs = []
    monkeypatch.setattr(serve_vllm.os, "execve", lambda f, a, e: execs.append((a, e)))
    assert (
        serve_vllm.main(
            ["--target", "T", "--draft", str(ckpt), "--python", sys.executable, "--flavor", "cpu"]
        )
        == 0
    )
    _argv, env = execs[0]
    assert (ckpt.parent / f"{ckpt.name}-hf" / "model.safetensors").is_file()
    assert "VLLM_CPU_KVCACHE_SPACE" in env and "VIRTUAL_ENV" not in env


def test_serve_clis_import_neither_sglang_nor_torch():
    code = (
        "import sys, modelopt_ext.serve_sglang, modelopt_ext.serve_vllm; "
        "print(sorted(m for m in ('sglang', 'vllm', 'torch') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[]"
