"""Export: exact keys and config for vLLM/SGLang, strict reload, bad checkpoints refused, atomic output."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelopt_ext import export as export_cli
from modelopt_ext.data.draft_vocab import DraftVocab
from modelopt_ext.deploy import export as export_mod
from modelopt_ext.deploy.export import ExportError, check_export, export_checkpoint
from modelopt_ext.drafters.eagle3.hf_format import EXPORT_KEYS
from modelopt_ext.drafters.eagle3.modeling import Eagle3Config, Eagle3DraftModel

from .conftest import DRAFT_VOCAB, VOCAB, make_checkpoint

REFERENCE_KEYS = {  # references.md section 5, written out so a change to EXPORT_KEYS cannot hide a drift
    "fc.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    *(f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
    *(f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    *(f"layers.0.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")),
}


def test_exported_keys_and_config(checkpoint, tmp_path):
    ckpt, model = checkpoint
    out = export_checkpoint(ckpt, tmp_path / "export")
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == REFERENCE_KEYS
    assert weights["d2t"].dtype == torch.int64 and weights["d2t"].shape == (DRAFT_VOCAB,)
    assert torch.equal(weights["d2t"], model.d2t)
    assert torch.equal(weights["fc.weight"], model.fc.weight.detach())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]  # top level, vLLM numbering
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert cfg["num_aux_hidden_states"] == 3
    assert (cfg["vocab_size"], cfg["draft_vocab_size"]) == (VOCAB, DRAFT_VOCAB)
    assert (cfg["hidden_size"], cfg["target_hidden_size"], cfg["head_dim"]) == (64, 64, 32)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (2, 1, 96)
    assert cfg["torch_dtype"] == "float32" and cfg["rope_theta"] == 10000.0 and "rms_norm_eps" in cfg
    assert cfg["target_model"] == "outputs/tiny/target"
    v = DraftVocab.load(out)
    assert torch.equal(v.d2t, model.d2t) and torch.equal(v.t2d, model.t2d)
    assert check_export(out)["draft_vocab_size"] == DRAFT_VOCAB
    assert sorted(p.name for p in out.parent.iterdir()) == ["export", "run"]  # no temp dirs left


def test_config_loads_with_transformers(checkpoint, tmp_path):
    from transformers import AutoConfig

    out = export_checkpoint(checkpoint[0], tmp_path / "export")
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 1
    assert cfg.eagle_aux_hidden_state_layer_ids == [1, 2, 3] and cfg.draft_vocab_size == DRAFT_VOCAB


def test_reload_into_a_fresh_model_strictly(checkpoint, tmp_path):
    ckpt, model = checkpoint
    out = export_checkpoint(ckpt, tmp_path / "export")
    fresh = Eagle3DraftModel(Eagle3Config.from_dict(json.loads((out / "config.json").read_text())))
    weights = load_file(str(out / "model.safetensors"))
    # The engines supply the target's embeddings; t2d comes from the vocab mapping.
    weights["embed_tokens.weight"] = model.embed_tokens.weight.detach()
    weights["t2d"] = DraftVocab.load(out).t2d
    fresh.load_state_dict(weights, strict=True)
    ids = torch.randint(VOCAB, (2, 9))
    aux = torch.randn(2, 9, 3 * 64)
    a = [x[0] for x in model.ttt(ids, aux, steps=2)]
    b = [x[0] for x in fresh.ttt(ids, aux, steps=2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_identity_vocab_has_no_d2t(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "run", draft_vocab=VOCAB)
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert set(load_file(str(out / "model.safetensors"))) == set(EXPORT_KEYS)  # vLLM rejects d2t when Vd == V
    check_export(out)


def test_index_keeps_the_vocab_mapping_out_of_the_weights(checkpoint, tmp_path):
    # vLLM and SGLang load every *.safetensors in the folder unless an index names the weight files;
    # vocab_mapping.safetensors then reaches the model as weights (vLLM refuses a full-vocab drafter).
    ckpt, _ = checkpoint
    out = export_checkpoint(ckpt, tmp_path / "export")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert set(index["weight_map"]) == set(load_file(str(out / "model.safetensors")))
    assert (out / "vocab_mapping.safetensors").is_file()
    index["weight_map"]["extra"] = "vocab_mapping.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ExportError, match="model.safetensors.index.json: weight_map"):
        check_export(out)


def test_dtype_cast_and_optional_t2d(checkpoint, tmp_path):
    out = export_checkpoint(checkpoint[0], tmp_path / "export", dtype="bfloat16", include_t2d=True)
    w = load_file(str(out / "model.safetensors"))
    assert (
        w["fc.weight"].dtype == torch.bfloat16
        and w["d2t"].dtype == torch.int64
        and w["t2d"].dtype == torch.bool
    )
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _rewrite_weights(ckpt, drop=(), add=None):
    path = ckpt / "model.safetensors"
    w = load_file(str(path))
    for k in drop:
        w.pop(k)
    w.update(add or {})
    save_file(w, str(path))
    return path


@pytest.mark.parametrize(
    "drop,add,words",
    [
        (["layers.0.hidden_norm.weight"], None, "missing keys ['layers.0.hidden_norm.weight']"),
        ([], {"midlayer.extra.weight": torch.zeros(2)}, "unexpected keys ['midlayer.extra.weight']"),
        (
            [],
            {"fc.weight": torch.zeros(64, 128)},
            "shapes do not match config.json: fc.weight (64, 128) != (64, 192)",
        ),
    ],
)
def test_bad_checkpoint_refused_with_one_line(checkpoint, tmp_path, capsys, drop, add, words):
    ckpt, _ = checkpoint
    path = _rewrite_weights(ckpt, drop, add)
    with pytest.raises(ExportError) as e:
        export_checkpoint(ckpt, tmp_path / "export")
    assert str(e.value).startswith(f"{path}: ") and words in str(e.value)
    assert not (tmp_path / "export").exists()
    rc = export_cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "export")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}: ")


def test_missing_config_and_vocab_mismatch(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    v = DraftVocab.load(ckpt)
    DraftVocab.from_selected_ids(v.selected_ids.flip(0), VOCAB).save(ckpt)
    with pytest.raises(ExportError, match="vocab_mapping.safetensors: d2t/t2d differ"):
        export_checkpoint(ckpt, tmp_path / "export")
    (ckpt / "config.json").unlink()
    with pytest.raises(ExportError, match=r"config.json: missing"):
        export_checkpoint(ckpt, tmp_path / "export")


def test_failure_mid_write_leaves_no_partial_folder(checkpoint, tmp_path, monkeypatch):
    ckpt, _ = checkpoint
    out = tmp_path / "export"
    export_checkpoint(ckpt, out)
    before = (out / "model.safetensors").read_bytes()

    def broken_save(self, dir):
        raise OSError("disk full")

    monkeypatch.setattr(DraftVocab, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(ckpt, out)
    assert (out / "model.safetensors").read_bytes() == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]
    with pytest.raises(OSError):
        export_checkpoint(ckpt, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_cli_prints_a_summary(checkpoint, tmp_path, capsys):
    assert export_cli.main(["--checkpoint", str(checkpoint[0]), "--out", str(tmp_path / "e")]) == 0
    assert "LlamaForCausalLMEagle3" in capsys.readouterr().out
    assert export_mod.check_export(tmp_path / "e")["num_hidden_layers"] == 1


def test_cli_latest_in_exports_the_newest_complete_checkpoint(checkpoint, tmp_path, capsys):
    # step 7 complete, step 12 complete (a copy), step 20 newest by name but incomplete (no trainer state):
    # the entry script's fallback export must take step 12, never the half-written step 20.
    run = checkpoint[0].parent
    shutil.copytree(checkpoint[0], run / "epoch_0_step_12")
    shutil.copytree(checkpoint[0], run / "epoch_1_step_20")
    (run / "epoch_1_step_20" / "trainer_state.json").unlink()
    assert export_cli.main(["--latest-in", str(run), "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert f"export: newest complete checkpoint in {run}: epoch_0_step_12\n" in out
    assert export_mod.check_export(tmp_path / "e")["num_hidden_layers"] == 1


def test_cli_latest_in_without_a_complete_checkpoint_is_one_line(checkpoint, tmp_path, capsys):
    run = checkpoint[0].parent
    (run / checkpoint[0].name / "trainer_state.json").unlink()
    assert export_cli.main(["--latest-in", str(run), "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err == (
        f"error: {run}: no complete checkpoint to export (1 incomplete checkpoint folder(s))\n"
    )
    assert export_cli.main(["--latest-in", str(tmp_path / "empty"), "--out", str(tmp_path / "e")]) == 2
    assert "no complete checkpoint to export (no epoch_E_step_S folder)" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_exporting_an_export_or_a_model_folder_says_it_is_not_a_checkpoint(checkpoint, tmp_path, capsys):
    export = export_checkpoint(checkpoint[0], tmp_path / "export")
    rc = export_cli.main(["--checkpoint", str(export), "--out", str(tmp_path / "again")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err == (
        f"error: {export}: an exported drafter (already what vLLM and SGLang load), not a training checkpoint "
        "(export takes an epoch_E_step_S/ folder the trainer wrote under training.output_dir)\n"
    )
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    with pytest.raises(
        ExportError, match=r"target: a model folder \(LlamaForCausalLM\), not a training checkpoint"
    ):
        export_checkpoint(target, tmp_path / "again")
    assert not (tmp_path / "again").exists()
