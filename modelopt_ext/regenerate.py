"""Regenerate the assistant turns of a conversations file with the target itself, through OpenAI-compatible servers.

    python -m modelopt_ext.regenerate --data IN.jsonl --out OUT.jsonl --servers http://a:8000,http://b:8000 \
        [--temperature 0.7] [--top-p 0.95] [--max-tokens 1024] [--concurrency 8] [--model NAME]

Argument parsing over `modelopt_ext.supply.regenerate.regenerate` (what is kept, parts and restarts, retries,
progress: that module's docstring). Bad input is one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys

from modelopt_ext.supply.regenerate import GenOptions, RegenError, regenerate


def main(argv: list[str] | None = None) -> int:
    """CLI; bad input is one line, exit 2."""
    p = argparse.ArgumentParser(prog="python -m modelopt_ext.regenerate", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="Conversations JSONL (messages or conversations form).")
    p.add_argument("--out", required=True, help="The regenerated conversations JSONL (written atomically).")
    p.add_argument("--servers", required=True, help="Comma-separated OpenAI-compatible server URLs.")
    p.add_argument("--model", default=None, help="Served model name (default: the first of /v1/models).")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--thinking", choices=("keep", "drop"), default="keep")
    p.add_argument("--max-attempts", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=8, help="Requests in flight.")
    p.add_argument("--part-size", type=int, default=64, help="Conversations per atomically written part.")
    p.add_argument("--rank", type=int, default=0, help="This node's share of the parts (with --world-size).")
    p.add_argument("--world-size", type=int, default=1)
    a = p.parse_args(argv)
    opts = GenOptions(a.temperature, a.top_p, a.max_tokens, a.thinking, a.max_attempts)
    servers = [u for u in a.servers.split(",") if u]
    try:
        regenerate(
            a.data, a.out, servers, opts=opts, model=a.model, concurrency=a.concurrency, part_size=a.part_size
        )
    except RegenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0



if __name__ == "__main__":
    sys.exit(main())
