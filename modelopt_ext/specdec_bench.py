"""Acceptance-length benchmark: chain speculative decoding of a drafter against its target (our reference decoder).

    python -m modelopt_ext.specdec_bench --target T --draft D --prompts FILE [--num-steps K]
        [--max-new-tokens 64] [--max-prompts N] [--temperature 0.7 --top-p 0.9 --seed 0]
        [--sweep K] [--out result.json] [--plot result.png]

T: a local transformers causal LM folder. D: a training checkpoint (`epoch_E_step_S/`), an exported
drafter folder, or a training output folder (its newest complete checkpoint: the weights the trainer
wrote, before any export step touched them). FILE: JSONL prompts (see modelopt_ext/acceptance/prompts.py).
Prints the mean acceptance length, acceptance per draft position, a repetition figure of the generated
text and tokens/s with and without the drafter, greedy and (with --temperature > 0) sampled by rejection
sampling as the serving engines verify; --sweep K adds a table for k = 1..K. Writes them as JSON (--out)
and a PNG plot (--plot, default next to --out).
Exits 1 if the greedy speculative output ever differs from the target's own greedy output, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modelopt_ext.acceptance.prompts import add_max_prompts_option, decode_options_error
from modelopt_ext.util.fileio import write_json_atomic

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.specdec_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--target", required=True, help="target model folder (transformers layout)")
    p.add_argument(
        "--draft", required=True,
        help="drafter folder: epoch_E_step_S/ checkpoint, export, or training output folder (newest checkpoint)",
    )  # fmt: skip
    p.add_argument("--prompts", required=True, help="JSONL prompts or conversations")
    p.add_argument(
        "--num-steps", type=int,
        help="draft tokens per round (chain length k; default: the drafter's, EAGLE-3 3, DFlash block size - 1)",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_max_prompts_option(p)
    p.add_argument(
        "--temperature", type=float, default=0.0,
        help="also measure at this temperature (rejection sampling); 0 = greedy only",
    )  # fmt: skip
    p.add_argument("--top-p", type=float, default=1.0, help="top-p of the sampled measurement")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled measurement")
    p.add_argument("--sweep", type=int, default=0, metavar="K", help="also measure k = 1..K (greedy)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="write the result JSON here (atomically)")
    p.add_argument("--plot", default=None, help="write the PNG plot here (default: --out with .png)")
    return p


def resolve_draft(path: Path) -> Path | None:
    """The drafter folder `--draft` names: itself when it holds a drafter, else (a training output folder)
    its newest complete checkpoint; None when neither."""
    from modelopt_ext.training.checkpoint import find_latest_checkpoint

    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    return find_latest_checkpoint(path) if path.is_dir() else None


def _print_result(label: str, r) -> None:
    per_pos = ", ".join(f"{a:.3f}" for a in r.acceptance_per_position)
    print(f"[{label}] mean acceptance length: {r.mean_acceptance_length:.3f}")
    print(f"[{label}] acceptance per draft position: [{per_pos}]")
    print(f"[{label}] repeated 4-grams in the output: {100 * r.repeated_4gram_fraction:.1f}%")
    print(
        f"[{label}] tokens/s: {r.tokens_per_s_speculative:.1f} with the drafter, {r.tokens_per_s_baseline:.1f} "
        f"without ({r.speedup:.2f}x)"
    )


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
    problem = decode_options_error(args)
    if problem:
        return _fail(problem)
    if args.sweep < 0:
        return _fail("--sweep must be >= 0")
    target_dir = Path(args.target)
    if not (target_dir / "config.json").is_file():
        return _fail(f"--target {target_dir}: no config.json (a local transformers model folder is needed)")
    draft_dir = resolve_draft(Path(args.draft))
    if draft_dir is None:
        return _fail(
            f"--draft {args.draft}: no config.json + model.safetensors and no complete epoch_E_step_S/ "
            "checkpoint in it (a drafter folder or a training output folder is needed)"
        )
    if not Path(args.prompts).is_file():
        return _fail(f"--prompts {args.prompts}: not found")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from modelopt_ext.acceptance.prompts import PromptFileError, prompt_set_name, read_prompts
    from modelopt_ext.acceptance.report import plot_acceptance, sweep_table
    from modelopt_ext.acceptance.specdec import Sampling, run_benchmark, sweep_chain_length
    from modelopt_ext.deploy.export import ExportError, drafter_of
    from modelopt_ext.drafters.hf_folder import read_json
    from modelopt_ext.targets.layers import check_layer_ids, target_num_layers

    hf_logging.disable_progress_bar()  # keep stderr to our own lines
    dtype = getattr(torch, args.dtype)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to(args.device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(target_dir)
    except (OSError, ValueError):
        tokenizer = None  # prompts given as input_ids still work
    embeddings = target.get_input_embeddings().weight
    try:
        drafter = drafter_of(draft_dir)
        cfg = read_json(draft_dir / "config.json")
        draft = drafter.load(draft_dir, embeddings)
        prompts = read_prompts(args.prompts, tokenizer, args.max_prompts)
        check_layer_ids(target_num_layers(target.config), drafter.layer_ids_of(cfg))
        if args.num_steps is None:
            args.num_steps = drafter.default_num_steps(cfg)
    except (ExportError, PromptFileError, ValueError) as e:
        return _fail(f"--draft {draft_dir}: {e}" if not str(e).startswith(str(draft_dir)) else str(e))
    for field, have in (("vocab_size", embeddings.shape[0]), ("target_hidden_size", embeddings.shape[1])):
        if field in cfg and int(cfg[field]) != have:
            return _fail(f"--draft {draft_dir}: {field} {cfg[field]} != the target's ({have})")
    draft = draft.to(device=args.device, dtype=dtype)
    eos = set() if args.ignore_eos else _eos_ids(target, tokenizer)

    proposer = drafter.proposer(draft, target)
    result, _ = run_benchmark(target, proposer, prompts, args.num_steps, args.max_new_tokens, eos)
    r = result.to_dict()
    r.update(
        target=str(target_dir),
        draft=str(draft_dir),
        prompts=str(args.prompts),
        prompt_set=prompt_set_name(args.prompts, len(prompts)),
        device=args.device,
        dtype=args.dtype,
    )
    print(
        f"prompts: {r['prompt_set']}  draft steps: {result.num_steps}  generated tokens: {result.generated_tokens}"
    )
    _print_result("greedy", result)
    print(f"output identical to target greedy: {result.outputs_match_greedy}")
    if args.temperature > 0:
        sampling = Sampling(args.temperature, args.top_p, args.seed)
        sampled, _ = run_benchmark(
            target, proposer, prompts, args.num_steps, args.max_new_tokens, eos, sampling
        )
        r["sampled"] = sampled.to_dict()
        _print_result(f"T={args.temperature:g} top-p={args.top_p:g}", sampled)
    if args.sweep:
        sweep = sweep_chain_length(
            target, proposer, prompts, args.sweep, args.max_new_tokens, eos,
            progress=lambda s: print(f"sweep: k={s.num_steps} done", file=sys.stderr, flush=True),
        )  # fmt: skip
        r["sweep"] = [s.to_dict() for s in sweep]
        print(f"chain-length sweep (greedy, {r['prompt_set']}):")
        print(sweep_table(r["sweep"]))
        if not all(s.outputs_match_greedy for s in sweep):
            r["outputs_match_greedy"] = False
    if args.out:
        write_json_atomic(Path(args.out), r)
        print(f"wrote {args.out}")
    plot = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if plot:
        plot_acceptance(r, plot, title=f"{draft_dir.name} on {target_dir.name}: {r['prompt_set']}")
        print(f"wrote {plot}")
    return 0 if r["outputs_match_greedy"] else 1


if __name__ == "__main__":
    sys.exit(main())
