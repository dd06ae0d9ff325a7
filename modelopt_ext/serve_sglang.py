"""CLI: serve a target with a drafter (EAGLE-3, DFlash) in SGLang.

    python -m modelopt_ext.serve_sglang --target T --draft D [--algorithm A] [--num-steps N --topk K
        --num-draft-tokens M] [--port 30000] [--tp-size 1] [--print-only] [-- extra sglang args]

D is a training checkpoint (`epoch_E_step_S/`, exported to a sibling `<name>-hf` first), an exported drafter
folder (copied to `<name>-sglang` with what SGLang needs changed, when anything does), or a hub id (passed
through; `--drafter` names its kind). The drafter decides the flags and their defaults: EAGLE-3 a chain of 3
steps (`--speculative-algorithm EAGLE3`, 4 draft tokens); DFlash its block size B from the export's config
(`--speculative-algorithm DFLASH --speculative-num-draft-tokens B`). `--print-only` prints the command and
writes nothing. Bad input or a missing sglang: one line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from modelopt_ext.deploy.drafter_ref import ServeError
from modelopt_ext.deploy.sglang import INSTALL_HINT, plan_sglang, prepare, sglang_available


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and the extra SGLang arguments after `--`."""
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.serve_sglang", description=__doc__.splitlines()[0]
    )
    p.add_argument("--target", required=True, help="Target model: a folder or a hub id.")
    p.add_argument("--draft", required=True, help="Checkpoint folder, exported drafter folder, or hub id.")
    p.add_argument(
        "--algorithm",
        help="SGLang algorithm (default: the drafter's own; an EAGLE-3 head also runs as EAGLE)",
    )
    p.add_argument("--drafter", help="Drafter kind of a hub id (default eagle3); folders say their own.")
    p.add_argument("--num-steps", type=int, help="EAGLE-3: draft steps per round (default 3).")
    p.add_argument("--topk", type=int, help="EAGLE-3: tree width (default 1, a chain).")
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        help="Tokens verified per round (default: EAGLE-3 steps + 1; DFlash its block size, the only value it takes).",
    )
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument(
        "--token-map",
        choices=["auto", "always", "never"],
        default="auto",
        help="EAGLE-3: write --speculative-token-map: auto = only when the weights cannot give SGLang the mapping.",
    )
    p.add_argument(
        "--layer-name",
        choices=["midlayer", "layers.0"],
        default="midlayer",
        help="EAGLE-3: name of the decoder layer's weights in the folder SGLang loads (SGLang's model: midlayer).",
    )
    p.add_argument("--python", help="Interpreter with sglang installed (default: this one).")
    p.add_argument("--print-only", action="store_true", help="Print the command; write and run nothing.")
    return p.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    """Plan, (unless --print-only) check sglang, write what is needed, and exec SGLang."""
    args, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    python = args.python or sys.executable
    try:
        plan = plan_sglang(
            args.target, args.draft, algorithm=args.algorithm, num_steps=args.num_steps, topk=args.topk,
            num_draft_tokens=args.num_draft_tokens, port=args.port, host=args.host, tp_size=args.tp_size,
            python=python, options={"token_map": args.token_map, "layer_name": args.layer_name}, extra=extra,
            drafter_name=args.drafter,
        )  # fmt: skip
        if args.print_only:
            for note in plan.notes:
                print(f"# {note}{' (not done: --print-only)' if plan.draft.export_from else ''}")
            print(shlex.join(plan.argv))
            return 0
        if not sglang_available(args.python):
            print(f"error: {INSTALL_HINT.format(python=python)}", file=sys.stderr)
            return 2
        prepare(plan)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"serve_sglang: {note}", file=sys.stderr)
    print(f"serve_sglang: exec {shlex.join(plan.argv)}", file=sys.stderr, flush=True)
    os.execvp(plan.argv[0], plan.argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
