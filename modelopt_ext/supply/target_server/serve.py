"""Run serve_target (the transformers target server) in this process.

`build_server` loads the target and builds the HTTP server (and its data plane) exactly as a colocated
trainer would compute supervision; `serve` runs it until POST /shutdown or SIGTERM/SIGINT. The CLI
(`python -m modelopt_ext.serve_target`) is argument parsing over these two.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelopt_ext.util.fileio import write_text_atomic

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ServeError(ValueError):
    """A setting serve_target cannot use (one line naming the flag)."""


def build_server(
    target: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    aux_layer_ids: Sequence[int] | None = None,
    token_file: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    data_plane: bool = True,
    max_batch_tokens: int = 1 << 20,
    threads: int | None = None,
) -> Any:
    """The `TargetServer` for `target`, listening on host:port (not serving yet). ServeError on bad settings."""
    if not 0 <= port < 65536:
        raise ServeError(f"--port {port} is not a port number")
    from modelopt_ext.supply.target_server.auth import TokenFileError, read_token_file
    from modelopt_ext.targets.locate import TargetPathError, resolve_target

    try:
        token = read_token_file(token_file) if token_file else None
        resolve_target(target, "--target")
    except (TokenFileError, TargetPathError) as e:
        raise ServeError(str(e)) from None

    import torch
    from transformers import AutoModelForCausalLM

    from modelopt_ext.supply.colocated import ColocatedSource, num_target_layers
    from modelopt_ext.supply.target_server.data_plane import DataPlaneError, DataPlaneServer, store_port
    from modelopt_ext.supply.target_server.handler import TargetHandler, check_aux_layer_ids
    from modelopt_ext.supply.target_server.http_server import TargetServer

    if threads:
        torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise ServeError(f"--device {device!r} is not a device") from None
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype).to(device)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad --target: one line
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ServeError(f"--target {target!r} cannot be loaded: {type(e).__name__}: {first}") from None
    try:
        aux = check_aux_layer_ids(num_target_layers(model), aux_layer_ids)
    except ValueError as e:
        raise ServeError(f"--aux-layer-ids: {e}") from None
    # The server runs the very object a colocated trainer would build: that is the parity guarantee.
    compute = ColocatedSource(model, aux)
    handler = TargetHandler(model, aux, compute=compute, model_name=target, max_batch_tokens=max_batch_tokens)
    try:
        server = TargetServer(handler, host, port, token=token)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    if data_plane:
        try:
            plane_port = store_port(server.server_address[1])
        except DataPlaneError as e:
            server.close()
            raise ServeError(str(e)) from None
        server.handler.data_plane = DataPlaneServer(host, plane_port, device=str(model.device))
    return server


def serve(server: Any, url_file: str | None = None) -> None:
    """Serve until POST /shutdown or SIGTERM/SIGINT; the URL goes to stdout and (atomically) to `url_file`."""

    def on_signal(signum, _frame) -> None:
        logging.getLogger("modelopt_ext.serve_target").info("signal %d: stopping", signum)
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if url_file:
        write_text_atomic(Path(url_file), server.url + "\n")
    print(f"serve_target: serving on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    print("serve_target: stopped", flush=True)
