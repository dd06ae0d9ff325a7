"""DFlash export: exactly the weights and config fields vLLM's DFlashDraftModel and SGLang's DFlash model read
(every field they would default silently written out), a strict check that names the file for a missing or
renamed field or key, and a reload that computes what the trained model computes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelopt_ext import export as export_cli
from modelopt_ext.data.draft_vocab import build_draft_vocab
from modelopt_ext.deploy.export import ExportError, check_export, drafter_of, export_checkpoint
from modelopt_ext.drafters import resolve_drafter
from modelopt_ext.drafters.dflash.hf_format import checkpoint_config_of_export
from modelopt_ext.drafters.dflash.modeling import DFlashConfig, DFlashDraftModel
from modelopt_ext.drafters.dflash.serving import DFLASH_CONFIG_FIELDS, EXPORT_FIELDS
from modelopt_ext.training.checkpoint import CheckpointContent, save_checkpoint
from modelopt_ext.training.distributed import DistEnv

VOCAB, HIDDEN, BLOCK, MASK = 48, 64, 4, 47
TARGET = {  # a 4-layer target whose RoPE base is NOT vLLM's DFlash default (1e6)
    "hidden_size": HIDDEN, "intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 32, "vocab_size": VOCAB, "num_hidden_layers": 4, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "max_position_embeddings": 2048,
}  # fmt: skip
# Written out (not derived from the exporter's lists) so a drift in either shows.
PER_LAYER = [
    *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    "input_layernorm.weight", "post_attention_layernorm.weight",
]  # fmt: skip


def make_dflash_checkpoint(output_dir, *, num_layers=2, aux=(1, 3), seed=0):
    """(checkpoint folder, model): a DFlash drafter saved by the trainer's own save_checkpoint."""
    torch.manual_seed(seed)
    cfg = DFlashConfig.from_target_config(
        dict(TARGET), list(aux), num_layers=num_layers, block_size=BLOCK, mask_token_id=MASK
    )
    model = DFlashDraftModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms away from 1, so a mix-up would show
    vocab = build_draft_vocab(torch.arange(VOCAB), VOCAB, VOCAB)  # DFlash: the whole vocabulary
    content = CheckpointContent(
        model_state=model.state_dict(),
        model_config={"drafter": "dflash", **cfg.to_dict(), "target_model": "outputs/tiny/target"},
        vocab=vocab, optimizer_state={}, scheduler_state={}, trainer_state={"epoch": 0, "global_step": 5},
        recipe={"drafter": "dflash", "model": {"path": "outputs/tiny/target"}},
    )  # fmt: skip
    return save_checkpoint(output_dir, 0, 5, DistEnv(), content), model


@pytest.fixture()
def dflash_checkpoint(tmp_path):
    return make_dflash_checkpoint(tmp_path / "run")


@pytest.fixture()
def dflash_export(dflash_checkpoint, tmp_path):
    return export_checkpoint(dflash_checkpoint[0], tmp_path / "export")


def test_export_holds_exactly_the_engines_weights(dflash_checkpoint, tmp_path):
    ckpt, model = dflash_checkpoint
    out = export_checkpoint(ckpt, tmp_path / "export")
    weights = load_file(str(out / "model.safetensors"))
    expected = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    expected |= {f"layers.{i}.{k}" for i in range(2) for k in PER_LAYER}
    assert set(weights) == expected  # no embed_tokens / lm_head / d2t / mask_embedding: the target's are used
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v), k
    assert weights["fc.weight"].shape == (HIDDEN, 2 * HIDDEN)  # two target layers, concatenated
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == expected  # the index keeps any other file out of vLLM's weights
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ]


def test_export_config_states_every_field_the_engines_would_default(dflash_export):
    cfg = json.loads((dflash_export / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["model_type"] == "qwen3"
    d = cfg["dflash_config"]
    # vLLM numbering [1, 3] (outputs of target layers 0 and 2) -> DFlash numbering, as z-lab's configs hold it
    assert d["target_layer_ids"] == [0, 2]
    assert d["block_size"] == cfg["block_size"] == BLOCK
    assert d["mask_token_id"] == MASK
    assert d["num_target_layers"] == cfg["num_target_layers"] == 4
    assert d["causal"] is False and d["use_aux_hidden_state"] is True
    assert cfg["layer_types"] == ["full_attention"] * 2  # bidirectional within the block, for SGLang too
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_parameters"]["rope_theta"] == 10000.0  # not vLLM's 1e6
    assert cfg["head_dim"] == 32 and cfg["num_key_value_heads"] == 1  # Qwen3Config defaults: 128, heads
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["max_position_embeddings"] == 2048
    assert cfg["vocab_size"] == cfg["draft_vocab_size"] == VOCAB  # no d2t expected by vLLM
    assert cfg["target_hidden_size"] == cfg["hidden_size"] == HIDDEN
    assert cfg["num_hidden_layers"] == 2 and cfg["attention_bias"] is False and cfg["is_neox_style"] is True
    assert set(EXPORT_FIELDS) <= set(cfg) and set(DFLASH_CONFIG_FIELDS) <= set(d)
    assert (
        "eagle_aux_hidden_state_layer_ids" not in cfg
    )  # vLLM would read it verbatim, EAGLE-3 claim the folder
    assert check_export(dflash_export)["dflash_config"] == d
    dflash = resolve_drafter("dflash")
    assert drafter_of(dflash_export) is dflash
    assert dflash.layer_ids_of(cfg) == [1, 3]  # back in the project's (vLLM) numbering
    assert dflash.default_num_steps(cfg) == BLOCK - 1


def test_reloaded_export_drafts_what_the_trained_model_drafts(dflash_checkpoint, dflash_export):
    _, model = dflash_checkpoint
    emb, head = torch.randn(VOCAB, HIDDEN), torch.randn(VOCAB, HIDDEN)
    model.set_target_tensors(emb, head)
    again = resolve_drafter("dflash").load(dflash_export, emb)
    again.set_target_tensors(emb, head)
    assert (
        DFlashConfig.from_dict(
            checkpoint_config_of_export(json.loads((dflash_export / "config.json").read_text()))
        )
        == again.config
    )
    ids, aux = torch.randint(0, VOCAB - 1, (1, 9)), torch.randn(1, 9, 2 * HIDDEN)
    anchors = torch.tensor([[2, 5]])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids, aux, anchors), model.eval()(ids, aux, anchors))


def test_dtype_cast_and_cli_summary(dflash_checkpoint, tmp_path, capsys):
    ckpt, _ = dflash_checkpoint
    assert (
        export_cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
        == 0
    )
    line = capsys.readouterr().out
    assert "DFlashDraftModel" in line and "aux layers [1, 3] (vLLM numbering)" in line
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _one_line_error(folder, *, names: str, says: str):
    with pytest.raises(ExportError) as e:
        check_export(folder)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(folder / names)) and says in msg, msg


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "field",
    ["head_dim", "rope_theta", "num_target_layers", "layer_types", "block_size", "target_hidden_size"],
)
def test_a_missing_top_level_field_fails_naming_config_json(dflash_export, field):
    _edit_config(dflash_export, lambda c: c.pop(field))
    _one_line_error(dflash_export, names="config.json", says=field)


@pytest.mark.parametrize("field", DFLASH_CONFIG_FIELDS)
def test_a_missing_dflash_config_field_fails_naming_config_json(dflash_export, field):
    _edit_config(dflash_export, lambda c: c["dflash_config"].pop(field))
    _one_line_error(dflash_export, names="config.json", says=field)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda c: c["dflash_config"].update(block_size=8), "dflash_config.block_size 8 != block_size 4"),
        (lambda c: c["dflash_config"].update(mask_token_id=VOCAB), "mask_token_id"),
        (lambda c: c["dflash_config"].update(target_layer_ids=[0, 4]), "target_layer_ids"),
        (lambda c: c["dflash_config"].update(causal="no"), "causal"),
        (lambda c: c.update(architectures=["Qwen3ForCausalLM"]), "architectures"),
        (lambda c: c.update(draft_vocab_size=32), "draft_vocab_size"),
        (lambda c: c.update(target_hidden_size=96), "target_hidden_size"),
        (lambda c: c.update(rope_theta=1e6), "rope_theta"),
    ],
    ids=[
        "block-mismatch",
        "mask-outside-vocab",
        "layer-out-of-range",
        "causal-not-bool",
        "architecture",
        "draft-vocab",
        "target-hidden",
        "rope-disagree",
    ],
)
def test_inconsistent_config_values_fail_naming_config_json(dflash_export, edit, says):
    _edit_config(dflash_export, edit)
    _one_line_error(dflash_export, names="config.json", says=says)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("rename", "unexpected keys ['layers.0.self_attn.qkv_proj.weight']"),
        ("drop", "missing keys ['norm.weight']"),
        ("extra", "unexpected keys ['lm_head.weight']"),
        ("shape", "fc.weight (64, 64) != (64, 128)"),
    ],
)
def test_a_missing_renamed_or_misshapen_weight_fails_naming_the_weights(dflash_export, change, says):
    path = dflash_export / "model.safetensors"
    w = load_file(str(path))
    if change == "rename":
        w["layers.0.self_attn.qkv_proj.weight"] = w.pop("layers.0.self_attn.q_proj.weight")
    elif change == "drop":
        w.pop("norm.weight")
    elif change == "extra":
        w["lm_head.weight"] = torch.zeros(VOCAB, HIDDEN)
    else:
        w["fc.weight"] = w["fc.weight"][:, :HIDDEN].contiguous()
    save_file(w, str(path))
    index = dflash_export / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: "model.safetensors" for k in w}}))
    _one_line_error(dflash_export, names="model.safetensors", says=says)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda c: c.pop("mask_token_id"), "missing fields ['mask_token_id']"),
        (lambda c: c.update(block_size=1), "block_size 1 must be an integer >= 2"),
        (lambda c: c.update(target_layer_ids=[0, 9]), "target_layer_ids [0, 9]"),
    ],
    ids=["no-mask-id", "block-1", "layer-out-of-range"],
)
def test_a_bad_checkpoint_is_refused_naming_its_config_and_writes_nothing(
    dflash_checkpoint, tmp_path, edit, says
):
    ckpt, _ = dflash_checkpoint
    _edit_config(ckpt, edit)
    with pytest.raises(ExportError) as e:
        export_checkpoint(ckpt, tmp_path / "export")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(ckpt / "config.json")) and says in msg, msg
    assert not (tmp_path / "export").exists()
