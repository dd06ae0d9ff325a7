"""serve_target: serve supervision from a frozen transformers target (EXACTLY the colocated code path).

    python -m modelopt_ext.serve_target --target MODEL_DIR --host 0.0.0.0 --port 8000 \\
        [--aux-layer-ids 2,16,29] [--token-file /job/private/token] [--dtype bfloat16] [--device cuda:0]

Prints `serve_target: serving on http://HOST:PORT` once it accepts requests (and writes the URL to
`--url-file` atomically, for rendezvous). Stops on POST /shutdown or SIGTERM/SIGINT. Protocol, data plane and
environment variables: docs/target-server.md. Bad arguments exit 2 with one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from modelopt_ext.supply.target_server.serve import DTYPES


def _fail(msg: str) -> NoReturn:
    print(f"serve_target: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _layer_ids(text: str) -> list[int]:
    from modelopt_ext.targets.layers import parse_capture_ids

    try:
        return parse_capture_ids(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.serve_target", description=__doc__.split("\n")[0]
    )
    p.add_argument("--target", required=True, help="target model folder (or hub id resolvable offline)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0 = any free port)")
    p.add_argument("--aux-layer-ids", type=_layer_ids, default=None, help="vLLM numbering, e.g. 2,16,29")
    p.add_argument("--token-file", default=None, help="bearer token file (private to the job)")
    p.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="target dtype (default: the checkpoint's)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--url-file", default=None, help="write the URL here (atomically) once serving")
    p.add_argument("--no-data-plane", action="store_true", help="wire format only (no NCCL/gloo groups)")
    p.add_argument("--max-batch-tokens", type=int, default=1 << 20, help="largest B*T accepted per generate")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, build the server (supply/target_server/serve.py) and serve until stopped."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from modelopt_ext.supply.target_server.serve import ServeError, build_server, serve

    try:
        server = build_server(
            args.target, host=args.host, port=args.port, aux_layer_ids=args.aux_layer_ids,
            token_file=args.token_file, dtype=args.dtype, device=args.device,
            data_plane=not args.no_data_plane, max_batch_tokens=args.max_batch_tokens, threads=args.threads,
        )  # fmt: skip
    except ServeError as e:
        _fail(str(e))
    serve(server, args.url_file)
    return 0

if __name__ == "__main__":
    code = main()
    # Everything is closed by now (sockets, sessions). Skip interpreter teardown: native destructors of
    # process groups and thread pools can take seconds, or block on a peer that is gone.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
