"""vLLM's CPU build decodes with an EAGLE-3 drafter in the export layout and reports acceptance.

An untrained drafter (random head, target embeddings shared as vLLM does) is enough to check the plumbing:
vLLM loads the export, speculation does not change greedy output, and the acceptance counters are
consistent (drafts > 0, 1 <= tau <= k + 1, per-position acceptance non-increasing). One offline engine start
(~1 min on 2 cores): the greedy reference is transformers' `generate` on the same fp32 target (the fitted tiny
target's top-1 margins are large, so vLLM's and transformers' greedy agree); the benchmark's own plain-vLLM
comparison (a second engine start) is exercised by the recorded runs in docs/vllm.md.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from safetensors.torch import save_file

# Timeout covers the fixtures too: tiny-target build + a server start took 800 s on 2 cores shared with
# two other vLLM servers; alone it is ~60-110 s.
pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(2400)]

NUM_STEPS = 3


def write_untrained_export(target_dir, out_dir, draft_vocab_size: int, seed: int = 0):
    """An untrained EAGLE-3 drafter for `target_dir`, exported by the project's exporter (what vLLM loads).

    Written as a training checkpoint first (draft state dict + Eagle3Config), then `export_checkpoint`, so
    the folder vLLM sees is exactly the real export layout. A reduced draft vocabulary (512 of 1024, from
    random token counts) as real runs have, or the full vocabulary (no d2t: vLLM 0.32 has no parameter for it
    then, and the export's index keeps vocab_mapping.safetensors out of the weights), the target's
    embeddings, the tiny recipe's aux layers [1, 2, 3].
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from modelopt_ext.data.draft_vocab import build_draft_vocab
    from modelopt_ext.deploy.export import export_checkpoint
    from modelopt_ext.drafters.eagle3.modeling import Eagle3Config, Eagle3DraftModel

    torch.manual_seed(seed)
    target_cfg = AutoConfig.from_pretrained(target_dir)
    draft = Eagle3DraftModel(
        Eagle3Config.from_target_config(target_cfg, [1, 2, 3], draft_vocab_size=draft_vocab_size)
    )
    counts = torch.randint(0, 1000, (target_cfg.vocab_size,), generator=torch.Generator().manual_seed(seed))
    draft.set_vocab(build_draft_vocab(counts, target_cfg.vocab_size, draft_vocab_size))
    draft.load_embeddings(load_file(str(target_dir / "model.safetensors"))["model.embed_tokens.weight"])
    ckpt = out_dir.parent / (out_dir.name + "_ckpt")
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in draft.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({**draft.config.to_dict(), "target_model": str(target_dir)}))
    return export_checkpoint(ckpt, out_dir)


@pytest.mark.parametrize("draft_vocab_size", [512, 1024], ids=["reduced_vocab", "full_vocab"])
def test_untrained_drafter_in_vllm(vllm_python, tiny_target, tmp_path, draft_vocab_size):
    from transformers import AutoModelForCausalLM

    from modelopt_ext.acceptance.vllm_acceptance import run_vllm_acceptance
    from modelopt_ext.targets.tiny import make_conversation

    export = write_untrained_export(tiny_target, tmp_path / "export", draft_vocab_size)
    rng = random.Random(5)
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for _ in range(6):
            conv = make_conversation(rng)
            f.write(json.dumps({"messages": [m for m in conv if m["role"] != "assistant"][:2]}) + "\n")
    r = run_vllm_acceptance(
        tiny_target, export, prompts, num_steps=NUM_STEPS, max_new_tokens=32, python=vllm_python,
        work_dir=tmp_path / "work", compare_plain=False, return_outputs=True,
    )  # fmt: skip
    summary = {k: v for k, v in r.items() if k not in ("draft", "prompt_ids", "outputs")}
    print("\nvLLM eagle3 (untrained drafter):", json.dumps(summary))
    model = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    for ids, out in zip(r["prompt_ids"], r["outputs"], strict=True):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=eos)
        assert out == ref[0, len(ids) :].tolist()  # speculation leaves greedy output unchanged
    assert r["num_drafts"] > 0 and r["num_draft_tokens"] == NUM_STEPS * r["num_drafts"]
    assert 1.0 <= r["mean_acceptance_length"] <= NUM_STEPS + 1
    pos = r["accepted_per_position"]
    assert len(pos) == NUM_STEPS and sum(pos) == r["num_accepted_tokens"]
    assert all(
        a >= b for a, b in itertools.pairwise(pos)
    )  # position i+1 is only reached after i was accepted
