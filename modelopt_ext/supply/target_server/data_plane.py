"""The tensor data plane between serve_target and one client: a dedicated 2-rank process group.

Why: HTTP bodies cost an encode, a socket copy and a decode per batch; between GPUs NCCL moves the same
bytes device to device. Each client gets its OWN group (server rank 0, client rank 1) built from an explicit
`TCPStore` the server hosts, under a per-session key prefix. Nothing here touches `torch.distributed`'s
default group, so it coexists with the trainer's own `init_process_group` (and many clients share one server).

Protocol (the HTTP layer drives it):
1. `POST /init_nccl` -> the server opens a session and starts forming its end of the group in a background
   thread; the reply names the store address, the session prefix and the backend. The client forms its end.
   NCCL when both ends are on CUDA, gloo otherwise (CPU: this is what CI exercises).
2. `POST /generate` with the session -> the HTTP reply is JSON metadata (key, dtype, shape per entry); only
   AFTER that reply is flushed does the server send the tensors (the client needs the shapes to allocate its
   receive buffers first; sending first would deadlock on a large message).
3. Every tensor travels as a flat uint8 view of its bytes (zero-copy for contiguous tensors), so bool, int8,
   int16, bf16 and fp8 cross backends that lack those dtypes. Empty tensors and None entries send nothing.
4. Anything failing (group never forms, peer gone, timeout) marks the session broken; the client falls back to
   the wire format. Teardown aborts only the local end and every wait has a timeout: nothing hangs on an
   absent peer.

Environment: `MODELOPT_EXT_ENABLE_NCCL` (1 default; 0 forces the wire format on both ends),
`MODELOPT_EXT_NCCL_PORT` (the store port; default HTTP port + 100; 0 picks a free port).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

from modelopt_ext.supply.target_server.wire import SUPPORTED_DTYPES

log = logging.getLogger("modelopt_ext.supply.target_server.data_plane")

ENV_ENABLE = "MODELOPT_EXT_ENABLE_NCCL"
ENV_PORT = "MODELOPT_EXT_NCCL_PORT"
SERVER_RANK, CLIENT_RANK = 0, 1
_DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in SUPPORTED_DTYPES}


class DataPlaneError(RuntimeError):
    """The data plane could not form or failed mid-transfer (callers fall back to the wire format)."""


def data_plane_enabled() -> bool:
    """`MODELOPT_EXT_ENABLE_NCCL` (default 1); 0/false/no/off forces the wire format."""
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def store_port(http_port: int) -> int:
    """`MODELOPT_EXT_NCCL_PORT`, else HTTP port + 100 (0 = any free port)."""
    raw = os.environ.get(ENV_PORT, "").strip()
    if not raw:
        return http_port + 100
    try:
        port = int(raw)
    except ValueError:
        raise DataPlaneError(f"{ENV_PORT}={raw!r} is not a port number") from None
    if not 0 <= port < 65536:
        raise DataPlaneError(f"{ENV_PORT}={raw!r} is not a port number")
    return port


# ---- tensor specs: what the JSON reply says so the receiver can allocate -----------------------------


def tensor_specs(tensors: Mapping[str, torch.Tensor | None]) -> list[dict]:
    """[{key, dtype, shape} | {key, none: true}] in send order."""
    out = []
    for key, t in tensors.items():
        if t is None:
            out.append({"key": key, "none": True})
        else:
            if t.dtype not in SUPPORTED_DTYPES:
                raise DataPlaneError(f"entry {key!r} has unsupported dtype {t.dtype}")
            out.append({"key": key, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)})
    return out


def allocate(specs: list[dict], device: torch.device | str) -> dict[str, torch.Tensor | None]:
    """Empty receive buffers for `specs` (raises DataPlaneError on a malformed spec)."""
    out: dict[str, torch.Tensor | None] = {}
    try:
        for s in specs:
            if s.get("none"):
                out[s["key"]] = None
                continue
            dtype = _DTYPES_BY_NAME[s["dtype"]]
            shape = [int(d) for d in s["shape"]]
            if any(d < 0 for d in shape):
                raise ValueError(shape)
            out[s["key"]] = torch.empty(shape, dtype=dtype, device=device)
    except (KeyError, TypeError, ValueError) as e:
        raise DataPlaneError(f"malformed tensor spec in the server reply: {e!r}") from None
    return out


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    # Every dtype travels as raw bytes: gloo/NCCL lack bool/int16/fp8 reductions and some lack the types.
    return t.reshape(-1).view(torch.uint8)


# ---- process groups --------------------------------------------------------------------------------


def _local_address_towards(host: str, port: int) -> str:
    """The local IP this host uses to reach host:port (no packet is sent: UDP connect only routes)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def new_pair_group(
    backend: str,
    store: torch.distributed.Store,
    rank: int,
    *,
    timeout_s: float,
    bind_host: str | None,
    device: str,
):
    """A 2-rank group on `store` (already prefixed), never touching the default group.

    Blocks until the peer joins or `timeout_s` passes (then raises).
    """
    timeout = dt.timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = ProcessGroupGloo._Options()
        opts._timeout = timeout
        # Gloo listens on the device's address and publishes it in the store: bind it to an address the peer
        # can reach (GLOO_SOCKET_IFNAME still wins through the default device when no host is given).
        dev = (
            ProcessGroupGloo.create_device(hostname=bind_host)
            if bind_host
            else ProcessGroupGloo.create_default_device()
        )
        opts._devices = [dev]
        return ProcessGroupGloo(store, rank, 2, opts)
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL  # absent from CPU builds: callers catch ImportError

        opts = ProcessGroupNCCL.Options()
        opts._timeout = timeout
        dev = torch.device(device)
        torch.cuda.set_device(dev)
        pg = ProcessGroupNCCL(store, rank, 2, opts)
        # Connect now so a failure shows in the handshake, not in the first generate.
        pg.eager_connect_single_device(dev)
        return pg
    raise DataPlaneError(f"unknown data-plane backend {backend!r}")


def _abort(pg) -> None:
    """Tear down only the local end; never waits for the peer."""
    if pg is None:
        return
    for name in ("abort", "shutdown"):
        fn = getattr(pg, name, None)
        if fn is None:
            continue
        try:
            fn()
            return
        except Exception as e:  # noqa: BLE001 - teardown must not raise; the session is gone either way
            log.debug("data plane %s failed: %s", name, e)


def _wait(work, timeout_s: float) -> None:
    if not work.wait(dt.timedelta(seconds=timeout_s)):
        raise DataPlaneError(f"data-plane transfer timed out after {timeout_s:g}s")


# ---- server side -----------------------------------------------------------------------------------


@dataclass
class _Session:
    id: str
    backend: str
    device: str
    ready: threading.Event
    lock: threading.Lock
    pg: object = None
    error: str | None = None
    closed: bool = False


class ServerSession:
    """The server's end of one client's group (rank 0)."""

    def __init__(self, s: _Session, op_timeout_s: float):
        self._s = s
        self.op_timeout_s = op_timeout_s

    @property
    def id(self) -> str:
        return self._s.id

    @property
    def backend(self) -> str:
        return self._s.backend

    @property
    def device(self) -> str:
        return self._s.device

    def usable(self, wait_s: float = 0.0) -> bool:
        """True once the group formed and nothing has failed since."""
        self._s.ready.wait(wait_s)
        return self._s.ready.is_set() and self._s.pg is not None and not self._s.error and not self._s.closed

    @property
    def error(self) -> str | None:
        return self._s.error

    def send(self, tensors: Mapping[str, torch.Tensor | None]) -> None:
        """Send `tensors` in order (call after the reply carrying `tensor_specs(tensors)` is flushed)."""
        with self._s.lock:
            if not self.usable():
                raise DataPlaneError(
                    f"data-plane session {self.id} is not usable: {self._s.error or 'closed'}"
                )
            try:
                for tag, t in enumerate(tensors.values()):
                    if t is None or t.numel() == 0:
                        continue
                    buf = _byte_view(t.detach().contiguous())
                    _wait(self._s.pg.send([buf], CLIENT_RANK, tag), self.op_timeout_s)
            except Exception as e:  # noqa: BLE001
                self._s.error = f"send failed: {e}".splitlines()[0]
                _abort(self._s.pg)
                raise DataPlaneError(f"data-plane session {self.id}: {self._s.error}") from None

    def close(self) -> None:
        """Abort the local end (idempotent, never blocks on the peer)."""
        self._s.closed = True
        _abort(self._s.pg)


class DataPlaneServer:
    """Hosts the TCPStore and forms one 2-rank group per client session."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        handshake_timeout_s: float = 30.0,
        op_timeout_s: float = 120.0,
        device: str = "cpu",
    ):
        self.host = host
        self.requested_port = port
        self.handshake_timeout_s = handshake_timeout_s
        self.op_timeout_s = op_timeout_s
        self.device = device
        self._store: TCPStore | None = None
        self._store_error: str | None = None
        self._lock = threading.Lock()
        self._sessions: dict[str, ServerSession] = {}

    @property
    def port(self) -> int | None:
        return self._store.port if self._store is not None else None

    def _ensure_store(self) -> TCPStore:
        with self._lock:
            if self._store is None and self._store_error is None:
                try:
                    self._store = TCPStore(
                        self.host if self.host not in ("", "0.0.0.0", "::") else "0.0.0.0",
                        self.requested_port,
                        None,
                        True,
                        timeout=dt.timedelta(seconds=self.handshake_timeout_s),
                        wait_for_workers=False,
                    )
                    log.info("data plane: store listening on port %d", self._store.port)
                except Exception as e:  # noqa: BLE001
                    # Remembered: a port in use stays in use; every client falls back to the wire format.
                    self._store_error = (
                        f"cannot host the store on port {self.requested_port}: {e}".splitlines()[0]
                    )
                    log.warning("data plane disabled: %s", self._store_error)
            if self._store is None:
                raise DataPlaneError(self._store_error or "store unavailable")
            return self._store

    def open(self, client_backend: str, local_addr: str | None = None) -> tuple[ServerSession, dict]:
        """Open a session and start forming the server's end; returns it and the reply for the client.

        `local_addr`: the server address the client's HTTP request arrived on, i.e. one the client can reach;
        gloo binds there when the server listens on all interfaces (a resolved hostname may be unreachable).
        """
        if not data_plane_enabled():
            raise DataPlaneError(f"{ENV_ENABLE}=0 on the server")
        store = self._ensure_store()
        server_cuda = self.device.startswith("cuda")
        backend = "nccl" if (client_backend == "nccl" and server_cuda) else "gloo"
        sid = uuid.uuid4().hex
        s = _Session(
            id=sid,
            backend=backend,
            device=self.device if backend == "nccl" else "cpu",
            ready=threading.Event(),
            lock=threading.Lock(),
        )
        session = ServerSession(s, self.op_timeout_s)
        bind_host = self.host if self.host not in ("", "0.0.0.0", "::") else local_addr

        def form() -> None:
            try:
                pg = new_pair_group(
                    backend,
                    PrefixStore(f"modelopt_ext/dp/{sid}", store),
                    SERVER_RANK,
                    timeout_s=self.handshake_timeout_s,
                    bind_host=bind_host,
                    device=s.device,
                )
                if s.closed:
                    _abort(pg)
                else:
                    s.pg = pg
                    log.info("data plane: session %s formed (%s)", sid[:8], backend)
            except Exception as e:  # noqa: BLE001
                s.error = f"group did not form: {e}".splitlines()[0]
                # A session the client already gave up on (it fell back to the wire) is no news.
                log.log(
                    logging.DEBUG if s.closed else logging.WARNING,
                    "data plane: session %s: %s",
                    sid[:8],
                    s.error,
                )
            finally:
                s.ready.set()

        threading.Thread(target=form, name=f"dp-form-{sid[:8]}", daemon=True).start()
        with self._lock:
            self._sessions[sid] = session
        reply = {
            "session": sid,
            "backend": backend,
            "store_port": store.port,
            "prefix": f"modelopt_ext/dp/{sid}",
            "handshake_timeout_s": self.handshake_timeout_s,
            "op_timeout_s": self.op_timeout_s,
        }
        return session, reply

    def get(self, sid: str) -> ServerSession | None:
        with self._lock:
            return self._sessions.get(sid)

    def close(self, sid: str) -> bool:
        """Close one session; False if unknown."""
        with self._lock:
            session = self._sessions.pop(sid, None)
        if session is None:
            return False
        session.close()
        return True

    def close_all(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.close()

    @property
    def num_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)


# ---- client side -----------------------------------------------------------------------------------


class ClientSession:
    """The client's end (rank 1) of its group with the server."""

    def __init__(self, server_host: str, reply: dict, *, device: str = "cpu"):
        self.id = reply["session"]
        self.backend = reply["backend"]
        self.device = device if self.backend == "nccl" else "cpu"
        self.op_timeout_s = float(reply.get("op_timeout_s", 120.0))
        timeout_s = float(reply.get("handshake_timeout_s", 30.0))
        port = int(reply["store_port"])
        self._pg = None
        try:
            store = TCPStore(
                server_host,
                port,
                None,
                False,
                timeout=dt.timedelta(seconds=timeout_s),
                wait_for_workers=False,
            )
            self._pg = new_pair_group(
                self.backend,
                PrefixStore(reply["prefix"], store),
                CLIENT_RANK,
                timeout_s=timeout_s,
                bind_host=_local_address_towards(server_host, port) if self.backend == "gloo" else None,
                device=self.device,
            )
        except Exception as e:  # noqa: BLE001
            raise DataPlaneError(
                f"group with {server_host}:{port} did not form: {e}".splitlines()[0]
            ) from None

    def recv(self, specs: list[dict]) -> dict[str, torch.Tensor | None]:
        """Receive the tensors the server sends after a reply carrying `specs`."""
        out = allocate(specs, self.device)
        try:
            for tag, t in enumerate(out.values()):
                if t is None or t.numel() == 0:
                    continue
                _wait(self._pg.recv([_byte_view(t)], SERVER_RANK, tag), self.op_timeout_s)
        except Exception as e:  # noqa: BLE001
            self.close()
            raise DataPlaneError(f"receive failed: {e}".splitlines()[0]) from None
        return out

    def close(self) -> None:
        """Abort the local end (never waits for the server)."""
        pg, self._pg = self._pg, None
        _abort(pg)
