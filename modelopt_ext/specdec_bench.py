"""Acceptance-length benchmark: greedy chain speculative decoding of an EAGLE-3 drafter against its target.

    python -m modelopt_ext.specdec_bench --target T --draft D --prompts FILE [--num-steps 3]
        [--max-new-tokens 64] [--max-prompts N] [--out result.json]

T: a local transformers causal LM folder. D: a training checkpoint (`epoch_E_step_S/`) or an exported
drafter folder. FILE: JSONL prompts (see modelopt_ext/bench/prompts.py). Prints the mean acceptance
length, acceptance per draft position and tokens/s with and without the drafter, and writes them as JSON.
Exits 1 if the speculative output ever differs from the target's own greedy output, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modelopt_ext.fileio import write_json_atomic

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.specdec_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--target", required=True, help="target model folder (transformers layout)")
    p.add_argument("--draft", required=True, help="drafter folder: epoch_E_step_S/ checkpoint or export")
    p.add_argument("--prompts", required=True, help="JSONL prompts or conversations")
    p.add_argument("--num-steps", type=int, default=3, help="draft tokens per round (chain length k)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="write the result JSON here (atomically)")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _eos_ids(target, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(target, "generation_config", None), tokenizer):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(int(i) for i in v)
    return ids


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.num_steps < 1 or args.max_new_tokens < 1:
        return _fail("--num-steps and --max-new-tokens must be >= 1")
    target_dir = Path(args.target)
    if not (target_dir / "config.json").is_file():
        return _fail(f"--target {target_dir}: no config.json (a local transformers model folder is needed)")
    for name in ("config.json", "model.safetensors"):
        if not (Path(args.draft) / name).is_file():
            return _fail(
                f"--draft {Path(args.draft) / name}: not found (a drafter folder needs config.json and "
                "model.safetensors)"
            )
    if not Path(args.prompts).is_file():
        return _fail(f"--prompts {args.prompts}: not found")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from modelopt_ext.bench.prompts import PromptFileError, read_prompts
    from modelopt_ext.bench.specdec import Eagle3Proposer, run_benchmark
    from modelopt_ext.models.loading import DrafterLoadError, load_drafter
    from modelopt_ext.supervision.colocated import num_target_layers

    hf_logging.disable_progress_bar()  # keep stderr to our own lines
    dtype = getattr(torch, args.dtype)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to(args.device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(target_dir)
    except (OSError, ValueError):
        tokenizer = None  # prompts given as input_ids still work
    try:
        draft = load_drafter(args.draft, target.get_input_embeddings().weight)
        prompts = read_prompts(args.prompts, tokenizer, args.max_prompts)
    except (DrafterLoadError, PromptFileError) as e:
        return _fail(str(e))
    cfg = draft.config
    layers = num_target_layers(target)
    if cfg.vocab_size != target.get_input_embeddings().weight.shape[0]:
        return _fail(f"--draft {args.draft}: vocab_size {cfg.vocab_size} != the target's")
    if cfg.target_hidden_size != target.get_input_embeddings().weight.shape[1]:
        return _fail(
            f"--draft {args.draft}: target_hidden_size {cfg.target_hidden_size} != the target's hidden size"
        )
    if any(not 0 <= i <= layers for i in cfg.aux_layer_ids):
        return _fail(f"--draft {args.draft}: aux layer ids {cfg.aux_layer_ids} outside 0..{layers}")
    draft = draft.to(device=args.device, dtype=dtype)
    eos = set() if args.ignore_eos else _eos_ids(target, tokenizer)

    result, _ = run_benchmark(
        target, Eagle3Proposer(draft), prompts, args.num_steps, args.max_new_tokens, eos
    )
    r = result.to_dict()
    r.update(
        target=str(target_dir),
        draft=str(args.draft),
        prompts=str(args.prompts),
        device=args.device,
        dtype=args.dtype,
    )
    per_pos = ", ".join(f"{a:.3f}" for a in result.acceptance_per_position)
    print(
        f"prompts: {result.num_prompts}  draft steps: {result.num_steps}  generated tokens: {result.generated_tokens}"
    )
    print(f"mean acceptance length: {result.mean_acceptance_length:.3f}")
    print(f"acceptance per draft position: [{per_pos}]")
    print(
        f"tokens/s: {result.tokens_per_s_speculative:.1f} with the drafter, {result.tokens_per_s_baseline:.1f} "
        f"without ({result.speedup:.2f}x)"
    )
    print(f"output identical to target greedy: {result.outputs_match_greedy}")
    if args.out:
        write_json_atomic(Path(args.out), r)
        print(f"wrote {args.out}")
    return 0 if result.outputs_match_greedy else 1


if __name__ == "__main__":
    sys.exit(main())
