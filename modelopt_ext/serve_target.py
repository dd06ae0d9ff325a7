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
import signal
import sys
from pathlib import Path
from typing import NoReturn

from modelopt_ext.util.fileio import write_text_atomic

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _fail(msg: str) -> NoReturn:
    print(f"serve_target: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse_ids(text: str) -> list[int]:
    """'2,16,29' or '2 16 29' -> [2, 16, 29]."""
    try:
        ids = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 2,16,29, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("empty list")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.serve_target", description=__doc__.split("\n")[0]
    )
    p.add_argument("--target", required=True, help="target model folder (or hub id resolvable offline)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0 = any free port)")
    p.add_argument("--aux-layer-ids", type=parse_ids, default=None, help="vLLM numbering, e.g. 2,16,29")
    p.add_argument("--token-file", default=None, help="bearer token file (private to the job)")
    p.add_argument(
        "--dtype", choices=_DTYPES, default="auto", help="target dtype (default: the checkpoint's)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--url-file", default=None, help="write the URL here (atomically) once serving")
    p.add_argument("--no-data-plane", action="store_true", help="wire format only (no NCCL/gloo groups)")
    p.add_argument("--max-batch-tokens", type=int, default=1 << 20, help="largest B*T accepted per generate")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not 0 <= args.port < 65536:
        _fail(f"--port {args.port} is not a port number")

    from modelopt_ext.supply.target_server.auth import TokenFileError, read_token_file

    token = None
    if args.token_file:
        try:
            token = read_token_file(args.token_file)
        except TokenFileError as e:
            _fail(str(e))
    from modelopt_ext.targets.locate import TargetPathError, resolve_target

    try:
        resolve_target(args.target, "--target")
    except TargetPathError as e:
        _fail(str(e))

    import torch
    from transformers import AutoModelForCausalLM

    from modelopt_ext.supply.colocated import ColocatedSource, num_target_layers
    from modelopt_ext.supply.target_server.data_plane import DataPlaneError, DataPlaneServer, store_port
    from modelopt_ext.supply.target_server.handler import TargetHandler, check_aux_layer_ids
    from modelopt_ext.supply.target_server.http_server import TargetServer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        _fail(f"--device {device!r} is not a device")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(device)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad --target: one line, exit 2
        first = (str(e).splitlines() or [type(e).__name__])[0]
        _fail(f"--target {args.target!r} cannot be loaded: {type(e).__name__}: {first}")
    try:
        aux = check_aux_layer_ids(num_target_layers(model), args.aux_layer_ids)
    except ValueError as e:
        _fail(f"--aux-layer-ids: {e}")
    # The server runs the very object a colocated trainer would build: that is the parity guarantee.
    compute = ColocatedSource(model, aux)

    data_plane = None
    server = None
    try:
        server = TargetServer(
            TargetHandler(
                model, aux, compute=compute, model_name=args.target, max_batch_tokens=args.max_batch_tokens
            ),
            args.host,
            args.port,
            token=token,
        )
    except OSError as e:
        _fail(f"cannot listen on {args.host}:{args.port}: {e.strerror}")
    if not args.no_data_plane:
        try:
            port = store_port(server.server_address[1])
        except DataPlaneError as e:
            _fail(str(e))
        data_plane = DataPlaneServer(args.host, port, device=str(model.device))
        server.handler.data_plane = data_plane

    def on_signal(signum, _frame) -> None:
        logging.getLogger("modelopt_ext.serve_target").info("signal %d: stopping", signum)
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.url_file:
        write_text_atomic(Path(args.url_file), server.url + "\n")
    print(f"serve_target: serving on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    print("serve_target: stopped", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is closed by now (sockets, sessions). Skip interpreter teardown: native destructors of
    # process groups and thread pools can take seconds, or block on a peer that is gone.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
