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


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    """Check the arguments (bad input: one line, exit 2), then run the benchmark (acceptance/run.py)."""
    args = _parser().parse_args(argv)
    problem = decode_options_error(args)
    if problem:
        return _fail(problem)
    if args.sweep < 0:
        return _fail("--sweep must be >= 0")
    target_dir = Path(args.target)
    if not (target_dir / "config.json").is_file():
        return _fail(f"--target {target_dir}: no config.json (a local transformers model folder is needed)")
    from modelopt_ext.acceptance.run import resolve_draft

    draft_dir = resolve_draft(Path(args.draft))
    if draft_dir is None:
        return _fail(
            f"--draft {args.draft}: no config.json + model.safetensors and no complete epoch_E_step_S/ "
            "checkpoint in it (a drafter folder or a training output folder is needed)"
        )
    if not Path(args.prompts).is_file():
        return _fail(f"--prompts {args.prompts}: not found")

    from modelopt_ext.acceptance.run import BenchInputError, run_specdec_bench

    try:
        record = run_specdec_bench(
            target_dir, draft_dir, args.prompts, num_steps=args.num_steps, max_new_tokens=args.max_new_tokens,
            max_prompts=args.max_prompts, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            sweep=args.sweep, ignore_eos=args.ignore_eos, device=args.device, dtype=args.dtype,
            out=Path(args.out) if args.out else None, plot=Path(args.plot) if args.plot else None,
        )  # fmt: skip
    except BenchInputError as e:
        return _fail(str(e))
    return 0 if record["outputs_match_greedy"] else 1


if __name__ == "__main__":
    sys.exit(main())
