"""A small vLLM-like hidden-state server on loopback, speaking the real request/response/file contract.

It answers `POST /v1/completions` the way vLLM's hidden-state connector does: it takes an EXCLUSIVE flock on
`<root>/<req>.safetensors.lock` before answering, returns the path in `kv_transfer_params`, and writes the real
safetensors file (`token_ids` int64 [T], `hidden_states` [T, n_layers, H]) from a background thread after
`write_delay_s`, releasing the lock only then; so a reader that ignores the lock protocol reads nothing.

Hidden states are a known function of (token id, position, layer, channel) so tests can check every value.
Fault knobs (`mode`, `fail_first`, `die_after`) make it misbehave in the ways the streaming source must survive.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from safetensors.numpy import save_file

MODEL_ID = "tiny-target"


def expected_hidden(token_ids: list[int], n_layers: int, hidden: int):
    """The hidden states the fake server serves for a prompt: [T, n_layers, H] fp32 (a torch tensor)."""
    import torch

    return torch.from_numpy(_hidden_np(token_ids, n_layers, hidden))


def _hidden_np(token_ids: list[int], n_layers: int, hidden: int) -> np.ndarray:
    # numpy, not torch: the subprocess form of this server starts in a fraction of a second.
    ids = np.asarray(token_ids, dtype=np.float32)[:, None, None]
    pos = np.arange(len(token_ids), dtype=np.float32)[:, None, None]
    layer = np.arange(n_layers, dtype=np.float32)[None, :, None]
    chan = np.arange(hidden, dtype=np.float32)[None, None, :]
    return (ids + pos / 4 + layer * 1000 + chan / 8).astype(np.float32)


class FakeVllmServer:
    """Run with `start()`; `url` is its base URL; `kill()` closes it (later connections are refused)."""

    def __init__(
        self,
        root: str,
        *,
        n_layers: int = 4,
        hidden: int = 8,
        write_delay_s: float = 0.02,
        token: str | None = None,
        mode: str = "ok",
        fail_first: int = 0,
        die_after: int | None = None,
        escape_target: str = "/etc/passwd",
    ):
        self.root = root
        self.n_layers, self.hidden = n_layers, hidden
        self.write_delay_s = write_delay_s
        self.token = token
        self.mode = (
            mode  # ok | escape | symlink | dotdot | wrong_tokens | truncated | no_file | bad_json | 400
        )
        self.fail_first = fail_first  # answer 500 to the first N completions
        self.die_after = die_after  # shut down after answering N completions successfully
        self.escape_target = escape_target
        self.completions = 0  # requests received
        self.served: list[list[int]] = []  # prompts answered with a file
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._dead = threading.Event()
        self.on_die = self.kill  # what die_after does (the subprocess form exits the process instead)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> FakeVllmServer:
        """Bind an ephemeral loopback port and serve in a daemon thread."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a killed server refuses the next one

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if server.token is None:
                    return True
                if self.headers.get("Authorization") == f"Bearer {server.token}":
                    return True
                self._send(401, {"error": "unauthorized"})
                return False

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                if not self._authorized():
                    return
                n = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(n) or b"{}")
                if self.path != "/v1/completions":
                    return self._send(404, {"error": "not found"})
                code, obj = server._complete(body)
                self._send(code, obj)
                server._after_answer(code)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that gave up (timeout): not news
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        return self

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def kill(self) -> None:
        """Stop serving and close the listening socket (new connections are refused)."""
        if self._httpd is not None and not self._dead.is_set():
            self._dead.set()
            self._httpd.shutdown()
            self._httpd.server_close()

    # -- behaviour -------------------------------------------------------------------------------------
    def _after_answer(self, code: int) -> None:
        with self.lock:
            done = self.die_after is not None and code == 200 and len(self.served) >= self.die_after
        if done:
            threading.Thread(target=self.on_die, daemon=True).start()

    def _complete(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.completions += 1
            nth = self.completions
        if body.get("model") != MODEL_ID:
            return 404, {"error": f"model {body.get('model')!r} not found"}
        prompt = body.get("prompt")
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            return 400, {"error": "prompt must be token ids"}
        if nth <= self.fail_first:
            return 500, {"error": "internal error (injected)"}
        if self.mode == "hang":  # alive but never answering in time (overloaded or wedged)
            time.sleep(2.0)
            return 503, {"error": "too late"}
        if self.mode == "400":
            return 400, {"error": "prompt too long (injected)"}
        if self.mode == "bad_json":
            return 200, {"choices": []}
        path = os.path.join(self.root, f"{uuid.uuid4().hex}.safetensors")
        if self.mode == "escape":
            return 200, {"kv_transfer_params": {"hidden_states_path": self.escape_target}}
        if self.mode == "dotdot":
            return 200, {
                "kv_transfer_params": {
                    "hidden_states_path": self.root + "/../" + os.path.basename(self.escape_target)
                }
            }
        if self.mode == "symlink":
            os.symlink(self.escape_target, path)
            return 200, {"kv_transfer_params": {"hidden_states_path": path}}
        tokens = list(prompt)
        if self.mode == "wrong_tokens":
            tokens[len(tokens) // 2] += 1
        # vLLM pre-creates the lock with LOCK_EX before the client sees the path.
        lock_fd = os.open(path + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        threading.Thread(target=self._write, args=(path, tokens, lock_fd), daemon=True).start()
        with self.lock:
            self.served.append(list(prompt))
        return 200, {
            "id": "cmpl-x",
            "object": "text_completion",
            "model": MODEL_ID,
            "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
            "kv_transfer_params": {"hidden_states_path": path},
        }

    def _write(self, path: str, tokens: list[int], lock_fd: int) -> None:
        try:
            time.sleep(self.write_delay_s)
            if self.mode == "no_file":
                return
            # Written in place (not temp + rename), like vLLM: only the lock tells a reader it is complete.
            save_file(
                {
                    "token_ids": np.asarray(tokens, dtype=np.int64),
                    "hidden_states": _hidden_np(tokens, self.n_layers, self.hidden),
                },
                path,
            )
            if self.mode == "truncated":
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
        finally:
            os.close(lock_fd)  # releases LOCK_EX, as vLLM's writer thread does


def spawn(root: str, **kw) -> tuple[subprocess.Popen, str]:
    """Run the server in its own process (a real process death: the OS closes its sockets); -> (proc, url).

    Needed when the test forks DataLoader workers: forked children inherit an in-process server's listening
    socket, so closing it in the parent would leave connections hanging instead of refused.
    """
    args = [sys.executable, __file__, "--root", root]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()  # bounded: the child prints its URL or exits (EOF)
    if not line.startswith("http://"):
        proc.kill()
        raise RuntimeError(f"fake vLLM server did not start: {line!r}")
    return proc, line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=8)
    p.add_argument("--mode", default="ok")
    p.add_argument("--die-after", type=int, default=None)
    p.add_argument("--write-delay-s", type=float, default=0.02)
    a = p.parse_args()
    server = FakeVllmServer(
        a.root, n_layers=a.n_layers, hidden=a.hidden, mode=a.mode, write_delay_s=a.write_delay_s
    ).start()
    if a.die_after is not None:
        server.on_die = lambda: os._exit(0)  # die like a crashed process: sockets closed by the OS
        server.die_after = a.die_after
    print(server.url, flush=True)
    server._dead.wait()
    time.sleep(0.1)


if __name__ == "__main__":
    main()
