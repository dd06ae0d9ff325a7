"""Drafter folders (checkpoint and export layouts) and the specdec_bench CLI end to end on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from modelopt_ext import specdec_bench
from modelopt_ext.acceptance.prompts import PromptFileError, read_prompts
from modelopt_ext.drafters.eagle3.loading import DrafterLoadError, load_drafter
from tests.model.conftest import tiny_draft


def _save_checkpoint_layout(draft, folder):
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in draft.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**draft.config.to_dict(), "target_model": "t"}))


def _save_export_layout(draft, folder):
    """What vLLM loads: no embed_tokens, LlamaForCausalLMEagle3 config with top-level aux ids."""
    folder.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in draft.state_dict().items() if k not in ("embed_tokens.weight", "t2d")}
    save_file(sd, str(folder / "model.safetensors"))
    c = draft.config
    hf = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": 1,
        "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": c.rope_parameters(),
        "max_position_embeddings": c.max_position_embeddings,
        "eagle_aux_hidden_state_layer_ids": c.aux_layer_ids,
    }
    (folder / "config.json").write_text(json.dumps(hf))


def test_load_both_layouts_give_the_same_model(saved_target, tmp_path):
    target, _ = saved_target
    draft = tiny_draft(seed=6, draft_vocab_size=120)
    draft.load_embeddings(target.model.embed_tokens.weight)
    with torch.no_grad():
        draft.d2t.copy_(torch.arange(120))  # draft i -> target 2i
        draft.t2d.zero_().index_fill_(0, torch.arange(120) * 2, True)
    _save_checkpoint_layout(draft, tmp_path / "epoch_0_step_5")
    _save_export_layout(draft, tmp_path / "export")
    from modelopt_ext.deploy.export import export_checkpoint

    export_checkpoint(tmp_path / "epoch_0_step_5", tmp_path / "real_export")  # the [data] exporter
    a = load_drafter(tmp_path / "epoch_0_step_5")
    b = load_drafter(tmp_path / "export", target.model.embed_tokens.weight)
    c = load_drafter(tmp_path / "real_export", target.model.embed_tokens.weight)
    for k, v in draft.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k
        assert torch.equal(b.state_dict()[k], v), k  # t2d rebuilt from d2t
        assert torch.equal(c.state_dict()[k], v), k
    assert c.config.aux_layer_ids == draft.config.aux_layer_ids
    with pytest.raises(DrafterLoadError, match="embed_tokens"):
        load_drafter(tmp_path / "export")


def test_load_rejects_bad_folders(tmp_path):
    with pytest.raises(DrafterLoadError, match="config.json"):
        load_drafter(tmp_path)
    draft = tiny_draft()
    _save_checkpoint_layout(draft, tmp_path / "c")
    sd = {k: v.contiguous() for k, v in draft.state_dict().items()}
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(DrafterLoadError, match="unexpected keys \\['extra.weight'\\]"):
        load_drafter(tmp_path / "c")


def test_prompt_reader_forms(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"input_ids": [1, 2, 3]}\n\n{"input_ids": [4]}\n')
    assert read_prompts(f) == [[1, 2, 3], [4]]
    f.write_text('{"input_ids": [1, -2]}\n')
    with pytest.raises(PromptFileError, match=":1: input_ids"):
        read_prompts(f)
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(PromptFileError, match="need a tokenizer"):
        read_prompts(f)


def _tokenizer_with_template(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<user>", "<assistant>", "</s>"] + [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' </s> ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
    )
    fast.save_pretrained(folder)
    return fast


def test_cli_end_to_end(saved_target, tmp_path, capsys):
    target, tdir = saved_target
    tok = _tokenizer_with_template(tdir)
    draft = tiny_draft(seed=8)
    draft.load_embeddings(target.model.embed_tokens.weight)
    _save_export_layout(draft, tmp_path / "export")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            [
                json.dumps(
                    {
                        "conversations": [
                            {"from": "human", "value": "w1 w2 w3"},
                            {"from": "gpt", "value": "w4"},
                        ]
                    }
                ),
                json.dumps({"prompt": "w5 w6"}),
                json.dumps({"input_ids": [7, 8, 9, 10]}),
                "w7 w8 w9",
            ]
        )
    )
    assert (
        read_prompts(prompts, tok)[1]
        == tok.apply_chat_template(
            [{"role": "user", "content": "w5 w6"}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
    )
    out = tmp_path / "res" / "bench.json"
    rc = specdec_bench.main(
        [
            "--target",
            str(tdir),
            "--draft",
            str(tmp_path / "export"),
            "--prompts",
            str(prompts),
            "--num-steps",
            "3",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--out",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads(out.read_text())
    assert res["outputs_match_greedy"] is True and res["num_prompts"] == 4
    assert res["generated_tokens"] == 4 * 12
    assert 1.0 <= res["mean_acceptance_length"] <= 4.0 and len(res["acceptance_per_position"]) == 3
    assert res["tokens_per_s_baseline"] > 0 and res["tokens_per_s_speculative"] > 0
    assert "mean acceptance length" in text and "tokens/s" in text
    assert res["prompt_set"] == "prompts.jsonl (4 prompts)" and res["repeated_4gram_fraction"] >= 0.0
    assert (tmp_path / "res" / "bench.png").stat().st_size > 0


def test_cli_sampled_sweep_and_training_output_folder(saved_target, tmp_path, capsys):
    target, tdir = saved_target
    draft = tiny_draft(seed=8)
    draft.load_embeddings(target.model.embed_tokens.weight)
    # A training output folder: the newest complete checkpoint is the drafter.
    out_dir = tmp_path / "train_out"
    _save_export_layout(draft, out_dir / "epoch_0_step_5")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"input_ids": [3 + i, 4, 5, 6]}) for i in range(3)))
    out = tmp_path / "bench.json"
    args = ["--target", str(tdir), "--draft", str(out_dir), "--prompts", str(prompts), "--num-steps", "2",
            "--max-new-tokens", "10", "--ignore-eos", "--temperature", "0.8", "--top-p", "0.9", "--sweep", "3",
            "--limit", "2", "--out", str(out), "--plot", str(tmp_path / "p.png")]  # fmt: skip
    from modelopt_ext.training import checkpoint as ck

    ckpt = out_dir / "epoch_0_step_5"
    for name in ck.REQUIRED_FILES:  # the rest of a complete checkpoint (only the drafter files are read)
        if not (ckpt / name).exists():
            (ckpt / name).write_text("{}")
    state = {"epoch": 0, "global_step": 5, "data_position": 0, "world_size": 1}
    (ckpt / ck.STATE_FILE).write_text(json.dumps(state))
    (ckpt / ck.rng_file(0)).write_text("")
    _save_export_layout(draft, out_dir / "epoch_0_step_3_incomplete")  # not a checkpoint name: ignored
    assert ck.find_latest_checkpoint(out_dir) == ckpt
    rc = specdec_bench.main(args)
    cap = capsys.readouterr()
    assert rc == 0, cap.out + cap.err
    res = json.loads(out.read_text())
    assert res["num_prompts"] == 2 and "warning: --limit is deprecated" in cap.err
    assert res["draft"] == str(out_dir / "epoch_0_step_5")
    s = res["sampled"]
    assert s["temperature"] == 0.8 and s["top_p"] == 0.9 and s["outputs_match_greedy"] is None
    assert 1.0 <= s["mean_acceptance_length"] <= 3.0 and len(s["acceptance_per_position"]) == 2
    assert [r["num_steps"] for r in res["sweep"]] == [1, 2, 3]
    assert "chain-length sweep" in cap.out and (tmp_path / "p.png").stat().st_size > 0


def test_cli_bad_input_one_line_exit_2(tmp_path, saved_target, capsys):
    _, tdir = saved_target
    rc = specdec_bench.main(["--target", str(tmp_path / "nope"), "--draft", "x", "--prompts", "y"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--target" in err
    rc = specdec_bench.main(["--target", str(tdir), "--draft", str(tmp_path / "none"), "--prompts", "y"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "config.json" in err
