"""Acceptance of an exported drafter in a serving engine, as one record the job summary and gate read.

    python -m modelopt_ext.acceptance.engines --engine vllm|sglang --target T --draft EXPORT --prompts FILE
        [--num-steps K] [--max-new-tokens 32] [--max-prompts N] [--temperature T --top-p P --seed S]
        [--dtype float32] --json RECORD.json

Always writes RECORD.json (atomically): the engine's measurement (vLLM: `acceptance/vllm_acceptance.py`, its
greedy figures and, with a temperature, the sampled ones), or `{"engine", "skipped": why}` when the engine
is not available here (SGLang not installed), or `{"engine", "error": root cause}` when the engine could
not run the export (a finding for the gate, not a crash). Exit 0 measured or skipped, 1 engine failure,
2 bad input (prompts file, options).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modelopt_ext.acceptance.prompts import add_max_prompts_option
from modelopt_ext.util.fileio import write_json_atomic

ENGINES = ("vllm", "sglang")


def measure_sglang(args: argparse.Namespace) -> dict:
    """SGLang's record: skipped (with the reason) unless sglang imports in `--sglang-python`."""
    from modelopt_ext.deploy.sglang import sglang_available

    python = args.sglang_python or sys.executable
    base = {"engine": "sglang", "num_steps": args.num_steps}
    if not sglang_available(python):
        return {
            **base,
            "skipped": f"sglang is not installed for {python} (install it, or pass --sglang-python)",
        }
    # SGLang is importable but its offline engine is not driven from here yet; say so instead of guessing.
    return {**base, "skipped": "sglang is installed, but its acceptance measurement is not implemented yet"}


def measure_vllm(args: argparse.Namespace) -> dict:
    """vLLM's record (its own counters around generate), or an error record when it cannot run the export."""
    from modelopt_ext.acceptance.vllm_acceptance import BenchInputError, run_vllm_acceptance

    try:
        return run_vllm_acceptance(
            args.target, args.draft, args.prompts, num_steps=args.num_steps, max_new_tokens=args.max_new_tokens,
            max_prompts=args.max_prompts, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            dtype=args.dtype, compare_plain=False, work_dir=args.work_dir, timeout=args.timeout,
        )  # fmt: skip
    except (BenchInputError, RuntimeError) as e:
        return {"engine": "vllm", "num_steps": args.num_steps, "error": str(e)}


def main(argv: list[str] | None = None) -> int:
    """Measure one engine and write its record."""
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.acceptance.engines", description=__doc__.splitlines()[0]
    )
    p.add_argument("--engine", required=True, choices=ENGINES)
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True, help="Exported drafter folder (what the engine loads).")
    p.add_argument("--prompts", required=True, help="Prompts JSONL (the specdec_bench format).")
    p.add_argument(
        "--num-steps", type=int, help="num_speculative_tokens (default: the drafter's; EAGLE-3 3, DFlash B-1)"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_max_prompts_option(p)
    p.add_argument("--temperature", type=float, default=0.0, help="also measure at this temperature")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype", default="float32", help="The engine's model dtype (as specdec_bench's --dtype)."
    )
    p.add_argument("--timeout", type=float, default=1200, help="seconds one engine run may take")
    p.add_argument("--work-dir", help="Engine logs and inputs (default: a new temp folder).")
    p.add_argument("--sglang-python", help="Interpreter with sglang installed (default: this one).")
    p.add_argument("--json", required=True, help="Write the record here.")
    args = p.parse_args(argv)
    from modelopt_ext.acceptance.prompts import decode_options_error

    problem = decode_options_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from modelopt_ext.acceptance.prompts import PromptFileError

    try:
        rec = measure_vllm(args) if args.engine == "vllm" else measure_sglang(args)
    except PromptFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(Path(args.json), rec)
    from modelopt_ext.acceptance.gate import acceptance_lines

    for line in acceptance_lines(None, None, [rec]):
        print(line)
    return 1 if rec.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
