"""Stand-in hidden-state servers for the scaling benchmark: real protocols, a timed queue instead of a target.

    python -m modelopt_ext.bench.scaling_server --protocol vllm --rate 10 --root /shared --url-file u.txt
    python -m modelopt_ext.bench.scaling_server --protocol serve_target --rate 10 --url-file u.txt

A server produces `rate` samples/s: requests queue FIFO in front of one "accelerator" that spends 1/rate s
per sample (`--service exp`: exponentially distributed times of the same mean, a bursty supply). That is the
throughput model of a real server at a steady batch size; its forward pass is replaced by time, so hundreds
of requests per second cost this machine almost nothing.

- `vllm`: vLLM's hidden-state connector contract (`POST /v1/completions` -> `kv_transfer_params.
  hidden_states_path`; the safetensors file `token_ids` int64 [T] + `hidden_states` bf16 [T, layers, H],
  written under an exclusive flock on `<file>.lock`), as `supply/vllm/source.py` reads it. numpy only:
  starts in a fraction of a second.
- `serve_target`: the real serve_target HTTP server (`supply/target_server/http_server.py`, wire format) around a
  stand-in handler whose `generate` waits its turn in the queue and returns zero-valued supervision of the
  real shapes (aux [B, T, n_aux*H] + last hidden [B, T, H], bf16). No data plane (answers wire only).

Binds 127.0.0.1 only. Writes its URL to `--url-file` once listening; runs until killed.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import struct
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOOPBACK = "127.0.0.1"
MODEL_ID = "scaling-standin"


class FifoClock:
    """One accelerator: a request waits for those before it, then takes its service time (thread-safe)."""

    def __init__(self, rate: float, service: str = "const", seed: int = 0):
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.mean_s = 1.0 / rate
        self.service = service
        self._rng = random.Random(seed)
        self._free_at = 0.0
        self._lock = threading.Lock()
        self.served = 0

    def reserve(self, samples: int = 1) -> float:
        """The monotonic time at which `samples` queued now are done."""
        with self._lock:
            cost = sum(self._one() for _ in range(samples))
            self._free_at = max(self._free_at, time.monotonic()) + cost
            self.served += samples
            return self._free_at

    def _one(self) -> float:
        return self._rng.expovariate(1.0 / self.mean_s) if self.service == "exp" else self.mean_s

    def wait(self, samples: int = 1) -> None:
        """Block until this request's turn on the accelerator is over."""
        delay = self.reserve(samples) - time.monotonic()
        if delay > 0:
            time.sleep(delay)


# ------------------------------------------------------------------------------------------------- vLLM


def safetensors_blob(token_ids: list[int], layers: int, hidden: int, zeros: memoryview) -> list[bytes]:
    """The chunks of a safetensors file: token_ids int64 [T] and hidden_states bf16 [T, layers, H] (zeros)."""
    t = len(token_ids)
    n_ids, n_hs = 8 * t, 2 * t * layers * hidden
    header = {
        "token_ids": {"dtype": "I64", "shape": [t], "data_offsets": [0, n_ids]},
        "hidden_states": {
            "dtype": "BF16",
            "shape": [t, layers, hidden],
            "data_offsets": [n_ids, n_ids + n_hs],
        },
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return [struct.pack("<Q", len(raw)), raw, struct.pack(f"<{t}q", *token_ids), bytes(zeros[:n_hs])]


def serve_vllm(args: argparse.Namespace) -> ThreadingHTTPServer:
    """A vLLM-protocol stand-in on an ephemeral loopback port (served in a daemon thread)."""
    clock = FifoClock(args.rate, args.service, args.seed)
    root = os.path.realpath(args.root)
    zeros = memoryview(bytearray(2 * args.max_tokens * args.layers * args.hidden))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx uses it

        def log_message(self, *a) -> None:
            pass

        def _send(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})
            elif self.path == "/health":
                self._send(200, {"status": "ok", "served": clock.served})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            if self.path != "/v1/completions":
                return self._send(404, {"error": "not found"})
            ids = [int(x) for x in body.get("prompt", [])]
            if not ids or len(ids) > args.max_tokens:
                return self._send(400, {"error": f"prompt of {len(ids)} tokens (1..{args.max_tokens})"})
            clock.wait(1)
            path = os.path.join(root, f"{uuid.uuid4().hex}.safetensors")
            lock_fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                with open(path, "wb") as f:
                    f.writelines(safetensors_blob(ids, args.layers, args.hidden, zeros))
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(lock_fd)
            self._send(200, {"id": "cmpl", "kv_transfer_params": {"hidden_states_path": path}})

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

        def handle_error(self, request, client_address) -> None:  # a client that went away: not news
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                super().handle_error(request, client_address)

    srv = Server((LOOPBACK, 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


# ---------------------------------------------------------------------------------------- serve_target


class StandInTargetHandler:
    """The handler interface of `target_server.handler.TargetHandler`, with time instead of a target."""

    ENDPOINTS = ("health", "model_info", "input_embeddings", "generate", "init_nccl", "disconnect")

    def __init__(self, args: argparse.Namespace):
        import torch

        self.torch = torch
        self.clock = FifoClock(args.rate, args.service, args.seed)
        self.layers, self.hidden, self.vocab = args.layers, args.hidden, args.vocab

    def dispatch(self, endpoint, meta=None, tensors=None, client_id=None):
        from modelopt_ext.supply.target_server.handler import Reply

        torch = self.torch
        if endpoint == "health":
            return Reply({"status": "ok", "requests_served": self.clock.served})
        if endpoint == "model_info":
            return Reply(
                {
                    "model": MODEL_ID,
                    "num_layers": self.layers,
                    "hidden_size": self.hidden,
                    "vocab_size": self.vocab,
                    "aux_layer_ids": list(range(1, self.layers)),
                    "dtype": "bfloat16",
                }
            )
        if endpoint == "input_embeddings":
            return Reply({}, {"embed_tokens": torch.zeros(self.vocab, self.hidden, dtype=torch.bfloat16)})
        if endpoint == "init_nccl":
            return Reply({"data_plane": False, "reason": "stand-in server: wire format only"})
        if endpoint == "disconnect":
            return Reply({"disconnected": True})
        if endpoint != "generate":
            return Reply({"error": f"unknown endpoint {endpoint!r}"}, status=404)
        ids = (tensors or {}).get("input_ids")
        if ids is None or ids.dim() != 2:
            return Reply({"error": "generate needs input_ids [B, T]"}, status=400)
        b, t = ids.shape
        self.clock.wait(b)
        out = {
            "input_ids": ids,
            "attention_mask": tensors["attention_mask"],
            "loss_mask": tensors["loss_mask"],
            "aux_hidden_states": torch.zeros(b, t, (self.layers - 1) * self.hidden, dtype=torch.bfloat16),
            "target_last_hidden": torch.zeros(b, t, self.hidden, dtype=torch.bfloat16),
        }
        return Reply({"transport": "wire"}, out)

    def close(self) -> None:
        pass


def serve_target(args: argparse.Namespace):
    """The real serve_target HTTP server around the stand-in handler (served in a daemon thread)."""
    import torch

    from modelopt_ext.supply.target_server.http_server import TargetServer

    torch.set_num_threads(1)
    srv = TargetServer(StandInTargetHandler(args), LOOPBACK, 0)
    srv.start_in_thread()
    return srv


def main(argv: list[str] | None = None) -> int:
    """Start one stand-in server; write its URL to --url-file; serve until killed."""
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.bench.scaling_server", description=__doc__.splitlines()[0]
    )
    p.add_argument("--protocol", choices=("vllm", "serve_target"), required=True)
    p.add_argument("--rate", type=float, required=True, help="samples/s this server produces")
    p.add_argument("--service", choices=("const", "exp"), default="const", help="service-time distribution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="vllm: the shared-storage root for hidden-state files")
    p.add_argument("--layers", type=int, default=4, help="captured layers (aux + last)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--url-file", required=True)
    args = p.parse_args(argv)
    if args.rate <= 0:
        p.error("--rate must be > 0")
    if args.protocol == "vllm" and not (args.root and os.path.isdir(args.root)):
        p.error("--root must be an existing folder for --protocol vllm")
    srv = serve_vllm(args) if args.protocol == "vllm" else serve_target(args)
    host, port = srv.server_address[:2]
    tmp = args.url_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"http://{host}:{port}\n")
    os.replace(tmp, args.url_file)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
