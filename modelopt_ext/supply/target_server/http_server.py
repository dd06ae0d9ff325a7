"""HTTP plumbing for serve_target (stdlib `ThreadingHTTPServer`: no extra dependencies).

Routes (all answer JSON `{"error": "..."}` with a 4xx/5xx status on failure; the connection is never dropped):

    GET  /health                     liveness (open: without the token it says only {"status": "ok"})
    POST /model_info                 layers, hidden, vocab, aux layer ids, dtype, model
    POST /input_embeddings           -> tensors {"embed_tokens": [V, H]}
    POST /set_vocab_mapping          tensors {"selected_token_ids": int64 [Vd], "t2d": bool [V]}
    POST /generate                   tensors {"input_ids", "attention_mask", "loss_mask"} -> supervision
    POST /init_nccl                  JSON {"backend": "nccl"|"gloo"} -> data-plane session
    POST /disconnect                 drop this client's state
    POST /shutdown                   stop the server (token required; without a token only from loopback)

Bodies: JSON (`application/json`) or the tensor wire format (`application/x-modelopt-tensors`, see
`modelopt_ext.supply.target_server.wire`); with a wire body the JSON metadata travels in the `X-Modelopt-Meta` header. The client
identifies itself with `X-Modelopt-Client` and, when the server has a token, `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from modelopt_ext.supply.target_server.auth import bearer_ok
from modelopt_ext.supply.target_server.handler import Reply, TargetHandler
from modelopt_ext.supply.target_server.wire import CONTENT_TYPE as WIRE_TYPE
from modelopt_ext.supply.target_server.wire import WireFormatError, decode, encode_chunks

log = logging.getLogger("modelopt_ext.supply.target_server.http")

META_HEADER = "X-Modelopt-Meta"
CLIENT_HEADER = "X-Modelopt-Client"
JSON_TYPE = "application/json"

_ROUTES = {
    ("GET", "/health"): "health",
    ("POST", "/health"): "health",
    ("GET", "/model_info"): "model_info",
    ("POST", "/model_info"): "model_info",
    ("POST", "/input_embeddings"): "input_embeddings",
    ("POST", "/set_vocab_mapping"): "set_vocab_mapping",
    ("POST", "/generate"): "generate",
    ("POST", "/init_nccl"): "init_nccl",
    ("POST", "/disconnect"): "disconnect",
    ("POST", "/shutdown"): "shutdown",
}


class _Refuse(Exception):
    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.close = status, close


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per client thread, no per-request handshake
    server: TargetServer

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    # Other methods get the same JSON 405/404 as a wrong route, not the stdlib's HTML 501.
    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    # ---- plumbing --------------------------------------------------------------------------------------

    def _send_json(self, status: int, payload: dict, *, close: bool = False) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", JSON_TYPE)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> bytearray:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise _Refuse(411, "chunked bodies are not supported: send Content-Length", close=True)
        raw = self.headers.get("Content-Length")
        if raw is None:
            return bytearray()
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except ValueError:
            raise _Refuse(400, f"bad Content-Length {raw!r}", close=True) from None
        if n > self.server.max_body_bytes:
            raise _Refuse(
                413, f"body of {n} bytes exceeds the limit of {self.server.max_body_bytes}", close=True
            )
        # A bytearray read in place: the wire decoder then gives writable zero-copy tensors.
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.rfile.readinto(view[got:])
            if not k:
                raise _Refuse(400, f"body truncated: got {got} of {n} bytes", close=True)
            got += k
        return buf

    def _parse(self, body: bytearray) -> tuple[dict, dict]:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        meta: dict = {}
        tensors: dict = {}
        raw_meta = self.headers.get(META_HEADER)
        if raw_meta:
            try:
                meta = json.loads(raw_meta)
            except json.JSONDecodeError as e:
                raise _Refuse(400, f"{META_HEADER} header is not JSON: {e.msg}") from None
        if not body:
            pass
        elif ctype == WIRE_TYPE:
            try:
                tensors = decode(body)
            except WireFormatError as e:
                raise _Refuse(400, f"bad tensor body: {e}") from None
        elif ctype in (JSON_TYPE, ""):
            if not isinstance(meta, dict):
                raise _Refuse(400, f"{META_HEADER} header must be a JSON object")
            try:
                doc = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise _Refuse(400, f"body is not JSON: {getattr(e, 'msg', e)}") from None
            if not isinstance(doc, dict):
                raise _Refuse(400, f"JSON body must be an object, got {type(doc).__name__}")
            meta = {**meta, **doc}
        else:
            raise _Refuse(415, f"unsupported Content-Type {ctype!r}: use {JSON_TYPE} or {WIRE_TYPE}")
        if not isinstance(meta, dict):
            raise _Refuse(400, "JSON metadata must be an object")
        return meta, tensors

    def _write_reply(self, reply: Reply) -> None:
        if reply.tensors is None or reply.session is not None:
            self._send_json(reply.status, reply.meta)
            return
        chunks, total = encode_chunks(reply.tensors)
        self.send_response(reply.status)
        self.send_header("Content-Type", WIRE_TYPE)
        self.send_header("Content-Length", str(total))
        self.send_header(META_HEADER, json.dumps(reply.meta))
        self.end_headers()
        self.wfile.writelines(chunks)

    def _serve(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            endpoint = _ROUTES.get((method, path))
            if endpoint is None:
                known = sorted({p for _, p in _ROUTES})
                status = 404 if all(p != path for _, p in _ROUTES) else 405
                raise _Refuse(status, f"no route {method} {path}; routes: {known}")
            if not bearer_ok(self.headers.get("Authorization"), self.server.token):
                if endpoint == "health" and method == "GET":
                    # Liveness probes (the job's entry scripts, curl) carry no token, as with vLLM's /health;
                    # they learn that the server is up and nothing else.
                    self._send_json(200, {"status": "ok"})
                    return
                # The body is left unread, so this connection cannot be reused: close it after the reply.
                raise _Refuse(401, "missing or wrong bearer token", close=True)
            body = self._read_body()
            if endpoint == "shutdown":
                self._shutdown()
                return
            meta, tensors = self._parse(body)
            meta.pop("server_addr", None)
            if endpoint == "init_nccl":
                # The address this client reached us on: the one to bind the data plane to (see the handler).
                meta["server_addr"] = self.connection.getsockname()[0]
            reply = self.server.handler.dispatch(endpoint, meta, tensors, self.headers.get(CLIENT_HEADER))
            self._write_reply(reply)
            if reply.session is not None:
                # Tensors go AFTER the reply is on the wire: the client allocates from the specs first.
                self.wfile.flush()
                try:
                    reply.after_response()
                except Exception as e:  # noqa: BLE001
                    log.warning("data-plane send to client %s failed: %s", self.headers.get(CLIENT_HEADER), e)
        except _Refuse as e:
            self._send_json(e.status, {"error": str(e)}, close=e.close)
        except (BrokenPipeError, ConnectionResetError) as e:
            log.info("client %s went away: %s", self.address_string(), e)
            self.close_connection = True
        except Exception as e:  # plumbing bug: still answer, never drop the connection silently
            log.exception("request %s %s failed", method, path)
            try:
                self._send_json(
                    500, {"error": f"internal error: {type(e).__name__}: {e}".splitlines()[0]}, close=True
                )
            except OSError:
                self.close_connection = True

    def _shutdown(self) -> None:
        if self.server.token is None:
            try:
                loopback = ipaddress.ip_address(self.client_address[0]).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise _Refuse(403, "shutdown without a server token is only accepted from loopback")
        self._send_json(200, {"shutting_down": True}, close=True)
        log.info("shutdown requested by %s", self.address_string())
        self.server.request_stop()


class TargetServer(ThreadingHTTPServer):
    """serve_target's HTTP server around a `TargetHandler`."""

    daemon_threads = True  # a stuck client thread never blocks process exit
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        handler: TargetHandler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        max_body_bytes: int = 1 << 32,
    ):
        self.handler = handler
        self.token = token
        self.max_body_bytes = max_body_bytes
        self._stopping = threading.Event()
        self._served = False
        super().__init__((host, port), _RequestHandler)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until `request_stop()`/`close()` (also from a signal handler)."""
        self._served = True
        if not self._stopping.is_set():
            super().serve_forever(poll_interval)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{shown}:{port}"

    def request_stop(self) -> None:
        """Stop `serve_forever` from any thread (signal handler, /shutdown) without blocking the caller."""
        if not self._stopping.is_set():
            self._stopping.set()
            threading.Thread(target=self.shutdown, name="target-server-stop", daemon=True).start()

    def start_in_thread(self) -> threading.Thread:
        """Serve in a daemon thread (tests, embedding); stop with `close()`."""
        t = threading.Thread(target=self.serve_forever, name="target-server", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        """Stop serving, close the socket, tear down every data-plane session."""
        self._stopping.set()
        if self._served:  # socketserver's shutdown() waits forever if serve_forever never ran
            self.shutdown()
        self.server_close()
        self.handler.close()
