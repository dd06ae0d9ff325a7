"""vLLM's CPU build runs `method: dflash` on our DFlash export and reports acceptance (docs/dflash.md).

vLLM 0.32's CPU attention backend (CPU_ATTN) supports non-causal attention, which DFlash's proposer asserts
for every draft layer (`v1/spec_decode/dflash.py`), so the real engine can serve our export here. An
untrained drafter (the DFlash model of drafters/dflash/modeling.py, random weights, exported by the project's
exporter) checks the contract end to end: vLLM loads the folder (its own `DFlashQwen3ForCausalLM` takes every
weight name and shape; the target's embeddings and lm_head are shared), reads the layers from
`dflash_config.target_layer_ids` (+1), drafts blocks of B-1 masks, speculation leaves greedy output unchanged
(the reference is transformers' greedy `generate` on the same fp32 target), and the counters are consistent.
One engine start (~30 s on 2 cores). A trained drafter's acceptance through vLLM is measured by the DFlash
quickstart (examples/local/quickstart_dflash.yaml) and gated against specdec_bench there.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(2400)]

BLOCK = 4  # 3 drafts per round
AUX = [1, 3]  # vLLM numbering: the outputs of target layers 0 and 2 (DFlash ids [0, 2])


def write_untrained_dflash_export(target_dir, out_dir, seed: int = 0):
    """An untrained DFlash drafter for `target_dir`, saved as a training checkpoint, then exported."""
    from transformers import AutoConfig, AutoTokenizer

    from modelopt_ext.data.draft_vocab import build_draft_vocab
    from modelopt_ext.deploy.export import export_checkpoint
    from modelopt_ext.drafters.dflash import default_mask_token_id
    from modelopt_ext.drafters.dflash.modeling import DFlashConfig, DFlashDraftModel
    from modelopt_ext.training.checkpoint import CheckpointContent, save_checkpoint
    from modelopt_ext.training.distributed import DistEnv

    torch.manual_seed(seed)
    target_cfg = AutoConfig.from_pretrained(target_dir)
    vocab = target_cfg.vocab_size
    mask = default_mask_token_id(vocab, AutoTokenizer.from_pretrained(target_dir))
    cfg = DFlashConfig.from_target_config(target_cfg, AUX, num_layers=2, block_size=BLOCK, mask_token_id=mask)
    model = DFlashDraftModel(cfg)
    content = CheckpointContent(
        model_state=model.state_dict(), model_config={"drafter": "dflash", **cfg.to_dict()},
        vocab=build_draft_vocab(torch.ones(vocab), vocab, vocab), optimizer_state={}, scheduler_state={},
        trainer_state={"epoch": 0, "global_step": 0}, recipe={"drafter": "dflash"},
    )  # fmt: skip
    ckpt = save_checkpoint(out_dir.parent / "run", 0, 0, DistEnv(), content)
    return export_checkpoint(ckpt, out_dir)


def test_untrained_dflash_drafter_in_vllm(vllm_python, tiny_target, tmp_path):
    from transformers import AutoModelForCausalLM

    from modelopt_ext.acceptance.vllm_acceptance import run_vllm_acceptance
    from modelopt_ext.targets.tiny import make_conversation

    export = write_untrained_dflash_export(tiny_target, tmp_path / "export")
    rng = random.Random(5)
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for _ in range(6):
            conv = make_conversation(rng)
            f.write(json.dumps({"messages": [m for m in conv if m["role"] != "assistant"][:2]}) + "\n")
    r = run_vllm_acceptance(
        tiny_target, export, prompts, max_new_tokens=32, python=vllm_python, work_dir=tmp_path / "work",
        compare_plain=False, return_outputs=True,
    )  # fmt: skip
    summary = {k: v for k, v in r.items() if k not in ("draft", "prompt_ids", "outputs")}
    print("\nvLLM dflash (untrained drafter):", json.dumps(summary))
    log = (tmp_path / "work" / "spec.log").read_text(errors="replace")
    assert "method='dflash'" in log and "Resolved architecture: DFlashDraftModel" in log
    assert f"Using auxiliary layers from speculative config: {tuple(AUX)}" in log  # DFlash ids + 1
    assert "without its own embed_tokens" in log and "without its own lm_head" in log  # the target's are used
    assert r["num_steps"] == BLOCK - 1 and r["aux_layer_ids"] == AUX  # the drafter's default: B-1
    model = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    for ids, out in zip(r["prompt_ids"], r["outputs"], strict=True):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=eos)
        assert out == ref[0, len(ids) :].tolist()  # speculation leaves greedy output unchanged
    assert r["num_drafts"] > 0 and r["num_draft_tokens"] == (BLOCK - 1) * r["num_drafts"]
    assert 1.0 <= r["mean_acceptance_length"] <= BLOCK
    pos = r["accepted_per_position"]
    assert len(pos) == BLOCK - 1 and sum(pos) == r["num_accepted_tokens"]
    assert all(
        a >= b for a, b in itertools.pairwise(pos)
    )  # position i+1 is only reached after i was accepted


def test_vllm_refuses_what_our_check_refuses_first(tiny_target, tmp_path):
    """A DFlash export with a field vLLM would default is stopped before any engine starts (one line)."""
    from modelopt_ext.acceptance.vllm_acceptance import BenchInputError, run_vllm_acceptance

    export = write_untrained_dflash_export(tiny_target, tmp_path / "export")
    cfg = json.loads((export / "config.json").read_text())
    del cfg["dflash_config"]["mask_token_id"]
    (export / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "p.jsonl").write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    with pytest.raises(BenchInputError, match=r"config.json: dflash_config is missing \['mask_token_id'\]"):
        run_vllm_acceptance(tiny_target, export, tmp_path / "p.jsonl", python="/nonexistent/python")
