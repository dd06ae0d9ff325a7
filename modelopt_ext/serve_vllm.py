"""CLI: serve a target with a drafter (EAGLE-3, DFlash) in vLLM (from vLLM's own venv).

    python -m modelopt_ext.serve_vllm --target T --draft D [--num-speculative-tokens K] [--port 8000]
        [--tp-size 1] [--max-model-len N] [--dtype D] [--print-only] [-- extra vLLM args]

D is a training checkpoint (`epoch_E_step_S/`, exported to a sibling `<name>-hf` first), an exported drafter
folder, or a hub id (passed through; `--drafter` names its kind). The drafter decides the speculative config
and its default draft length: EAGLE-3 `{"method": "eagle3", "num_speculative_tokens": 3}`; DFlash
`{"method": "dflash", "num_speculative_tokens": B - 1}` with its block size B from the export's config. The
server runs under the python of vLLM's venv (`deploy.vllm_env.ensure_vllm_env`, built on first use), or
`--python`. `--print-only` prints the command and writes nothing (it does not build the venv either). Bad
input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from modelopt_ext.deploy import vllm_env
from modelopt_ext.deploy.drafter_ref import ServeError, materialise
from modelopt_ext.deploy.vllm import plan_vllm


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and the extra vLLM arguments after `--`."""
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="python -m modelopt_ext.serve_vllm", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="Target model: a folder or a hub id.")
    p.add_argument("--draft", required=True, help="Checkpoint folder, exported drafter folder, or hub id.")
    p.add_argument(
        "--num-speculative-tokens",
        "--num-steps",
        dest="num_speculative_tokens",
        type=int,
        help="Draft tokens per round (default: the drafter's; EAGLE-3 3, DFlash its block size - 1).",
    )
    p.add_argument("--drafter", help="Drafter kind of a hub id (default eagle3); folders say their own.")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--flavor", choices=["cpu", "gpu"], help="Default: detected (an NVIDIA device means gpu).")
    p.add_argument("--python", help="Interpreter with vLLM (default: vLLM's own venv).")
    p.add_argument(
        "--print-only", action="store_true", help="Print the command; write, build and run nothing."
    )
    return p.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    """Plan, (unless --print-only) get vLLM's python, export a checkpoint if needed, and exec the server."""
    args, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        flavor = args.flavor or vllm_env.detect_flavor()
        if args.python:
            python = args.python
        elif os.environ.get(vllm_env.PYTHON_VAR):
            python = os.environ[vllm_env.PYTHON_VAR]
        else:
            python = str(vllm_env.env_python(vllm_env.default_env_dir()))
        plan = plan_vllm(
            args.target, args.draft, python=python, num_speculative_tokens=args.num_speculative_tokens,
            host=args.host, port=args.port, tp_size=args.tp_size, max_model_len=args.max_model_len,
            dtype=args.dtype, flavor=flavor, extra=extra, drafter_name=args.drafter,
        )  # fmt: skip
        if args.print_only:
            for note in plan.notes:
                print(f"# {note}{' (not done: --print-only)' if plan.draft.export_from else ''}")
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.env.items())
            print((env + " " if env else "") + shlex.join(plan.argv))
            return 0
        if not args.python:
            plan.argv[0] = str(vllm_env.ensure_vllm_env(flavor=flavor))
        materialise(plan.draft)
    except (ServeError, vllm_env.VllmEnvError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"serve_vllm: {note}", file=sys.stderr)
    print(f"serve_vllm: exec {shlex.join(plan.argv)}", file=sys.stderr, flush=True)
    env = {**os.environ, **plan.env}
    env.pop("VIRTUAL_ENV", None)  # the project venv must not leak into vLLM's
    os.execve(plan.argv[0], plan.argv, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
