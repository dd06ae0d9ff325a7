"""Trainer-side client of serve_target: a supervision source that yields `Supervision` from a remote target.

    client = RemoteTargetClient("http://node:8000", token_file="/job/private/token")
    client.model_info(expect={"num_layers": 32, "hidden_size": 4096, "vocab_size": 128256,
                              "aux_layer_ids": [2, 16, 29]})     # refuses a mismatch with one line
    sup = client(batch)                                          # same contract as ColocatedSource
    client.close()

Transport: the wire format over HTTP, or (when `use_data_plane` and the server agrees) a dedicated 2-rank
NCCL/gloo group per client (`modelopt_ext.supply.target_server.data_plane`): JSON metadata comes in the HTTP reply,
the tensors over the group right after. If the group cannot form, or a transfer fails, the client logs it and
carries on over the wire format. One HTTP client (connection pool) per process, created lazily (after fork).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import torch

from modelopt_ext.supply.target_server.auth import read_token_file
from modelopt_ext.supply.target_server.data_plane import ClientSession, DataPlaneError, data_plane_enabled
from modelopt_ext.supply.target_server.wire import CONTENT_TYPE as WIRE_TYPE
from modelopt_ext.supply.target_server.wire import WireFormatError, decode, encode
from modelopt_ext.targets.supervision import Supervision
from modelopt_ext.telemetry.meter import REMOTE

log = logging.getLogger("modelopt_ext.supply.target_server.source")

META_HEADER = "X-Modelopt-Meta"
CLIENT_HEADER = "X-Modelopt-Client"
CHECKED_FIELDS = ("num_layers", "hidden_size", "vocab_size", "aux_layer_ids", "dtype")

_http_lock = threading.Lock()
_http: tuple[int, httpx.Client] | None = None


def _http_client() -> httpx.Client:
    """The process's one HTTP client (re-created in a forked child: pools must not cross fork)."""
    global _http
    with _http_lock:
        if _http is None or _http[0] != os.getpid():
            _http = (os.getpid(), httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)))
        return _http[1]


def _read_into_bytearray(r: httpx.Response) -> bytearray:
    """The body of a streamed response, copied once into a preallocated bytearray (writable for decode)."""
    n = int(r.headers.get("Content-Length", "-1"))
    if n < 0:
        return bytearray(r.read())
    buf = bytearray(n)
    pos = 0
    for chunk in r.iter_raw():
        if pos + len(chunk) > n:
            raise ValueError(f"body longer than its Content-Length {n}")
        buf[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    if pos != n:
        raise ValueError(f"body truncated: {pos} of {n} bytes")
    return buf


class RemoteTargetError(RuntimeError):
    """serve_target refused a request, answered garbage, or describes a different model (one line).

    `status`: the HTTP status of a refusal, None when the server could not be reached or answered garbage.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class TargetMismatch(RemoteTargetError):
    """The server serves another target than the recipe's (no other server will fix that batch)."""


class RemoteTargetClient:
    """A supervision source backed by a serve_target server (callable on a collated batch, like ColocatedSource)."""

    telemetry_kind = REMOTE  # a network fetch per batch: data wait, counted for `url`

    def __init__(
        self,
        url: str,
        token_file: str | os.PathLike | None = None,
        use_data_plane: bool = True,
        *,
        target_form: str = "logits",
        device: str | torch.device = "cpu",
        timeout_s: float = 600.0,
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"serve_target url {url!r}: expected http://host:port")
        if target_form not in ("logits", "probs"):
            raise ValueError(f"target_form must be 'logits' or 'probs', got {target_form!r}")
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.target_form = target_form
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.client_id = uuid.uuid4().hex
        token = read_token_file(token_file, what="token file") if token_file else None
        self._headers = {CLIENT_HEADER: self.client_id}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._want_data_plane = use_data_plane
        self._session: ClientSession | None = None
        self._data_plane_tried = False
        self._lock = threading.Lock()  # one generate at a time: data-plane sends/receives pair up in order
        self._info: dict | None = None
        self.last_meta: dict = {}

    # ---- HTTP ------------------------------------------------------------------------------------------

    def _post(
        self,
        endpoint: str,
        meta: Mapping | None = None,
        tensors: Mapping[str, torch.Tensor | None] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> tuple[dict, dict[str, torch.Tensor | None] | None]:
        """POST and return (metadata, tensors or None). Raises RemoteTargetError with the server's message."""
        headers = dict(self._headers)
        if tensors is not None:
            body = encode(tensors)
            headers["Content-Type"] = WIRE_TYPE
            if meta:
                headers[META_HEADER] = json.dumps(dict(meta))
        else:
            body = json.dumps(dict(meta or {})).encode()
            headers["Content-Type"] = "application/json"
        try:
            with _http_client().stream(
                "POST",
                f"{self.url}/{endpoint}",
                content=body,
                headers=headers,
                timeout=timeout_s or self.timeout_s,
            ) as r:
                ctype = r.headers.get("Content-Type", "").split(";")[0].strip()
                if r.status_code != 200:
                    r.read()
                    try:
                        msg = r.json()["error"]
                    except (ValueError, KeyError, TypeError):
                        msg = r.text[:200]
                    raise RemoteTargetError(
                        f"serve_target {self.url}/{endpoint} answered {r.status_code}: {msg}",
                        status=r.status_code,
                    )
                if ctype != WIRE_TYPE:
                    r.read()
                    return r.json(), None
                meta_out = json.loads(r.headers.get(META_HEADER, "{}"))
                buf = _read_into_bytearray(r)
            # Decoded tensors are views into `buf` (no further copy) and keep it alive.
            return meta_out, decode(buf)
        except httpx.HTTPError as e:
            raise RemoteTargetError(f"serve_target {self.url}/{endpoint}: {type(e).__name__}: {e}") from None
        except (WireFormatError, ValueError) as e:
            raise RemoteTargetError(f"serve_target {self.url}/{endpoint}: unreadable reply: {e}") from None

    # ---- endpoints -------------------------------------------------------------------------------------

    def health(self) -> dict:
        """The server's /health reply."""
        try:
            r = _http_client().get(f"{self.url}/health", headers=self._headers, timeout=10.0)
        except httpx.HTTPError as e:
            raise RemoteTargetError(f"serve_target {self.url}/health: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise RemoteTargetError(
                f"serve_target {self.url}/health answered {r.status_code}: {r.text[:200]}"
            )
        return r.json()

    def model_info(self, expect: Mapping[str, Any] | None = None) -> dict:
        """The server's model facts; with `expect`, refuse any mismatch in CHECKED_FIELDS given there.

        `expect` holds what the trainer's recipe assumes (num_layers, hidden_size, vocab_size, aux_layer_ids,
        dtype); a server running a different target, or capturing different layers, is refused with one line.
        """
        info, _ = self._post("model_info")
        self._info = info
        if expect:
            unknown = sorted(set(expect) - set(CHECKED_FIELDS))
            if unknown:
                raise ValueError(
                    f"model_info expect: unknown fields {unknown}; known: {list(CHECKED_FIELDS)}"
                )
            diffs = [
                f"{k} server={info.get(k)!r} expected={_norm(v)!r}"
                for k, v in expect.items()
                if v is not None and not (k == "dtype" and v == "auto") and _norm(info.get(k)) != _norm(v)
            ]
            if diffs:
                raise TargetMismatch(f"serve_target {self.url} serves a different target: {'; '.join(diffs)}")
        return info

    def input_embeddings(self) -> torch.Tensor:
        """The target's input embedding [V, H] (to seed the drafter's)."""
        _, tensors = self._post("input_embeddings")
        if not tensors or tensors.get("embed_tokens") is None:
            raise RemoteTargetError(f"serve_target {self.url}/input_embeddings: reply has no embed_tokens")
        return tensors["embed_tokens"]

    def set_vocab_mapping(self, selected_token_ids: torch.Tensor, t2d: torch.Tensor | None = None) -> int:
        """Register the draft vocabulary (needed for target_form='probs'); returns the draft vocab size."""
        tensors = {"selected_token_ids": selected_token_ids.detach().to("cpu", torch.int64)}
        if t2d is not None:
            tensors["t2d"] = t2d.detach().to("cpu", torch.bool)
        meta, _ = self._post("set_vocab_mapping", tensors=tensors)
        return int(meta["draft_vocab_size"])

    def _ensure_data_plane(self) -> None:
        if self._data_plane_tried:
            return
        self._data_plane_tried = True
        if not self._want_data_plane:
            return
        if not data_plane_enabled():
            log.info("data plane off (MODELOPT_EXT_ENABLE_NCCL=0): using the wire format")
            return
        backend = "nccl" if self.device.type == "cuda" and torch.distributed.is_nccl_available() else "gloo"
        reply, _ = self._post("init_nccl", {"backend": backend})
        if not reply.get("data_plane"):
            log.warning(
                "serve_target %s offers no data plane (%s): using the wire format",
                self.url,
                reply.get("reason"),
            )
            return
        try:
            self._session = ClientSession(self.host, reply, device=str(self.device))
            log.info(
                "data plane to %s formed (%s, session %s)", self.url, reply["backend"], reply["session"][:8]
            )
        except DataPlaneError as e:
            log.warning("data plane to %s failed, using the wire format: %s", self.url, e)
            self._drop_session()

    def _drop_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        # Tell the server so it stops waiting for this client; the wire format keeps working meanwhile.
        try:
            self._post("disconnect", {"data_plane_only": True}, timeout_s=10.0)
        except RemoteTargetError as e:
            log.debug("disconnect after data-plane failure: %s", e)

    @property
    def transport(self) -> str:
        """'data_plane' once a group formed, else 'wire'."""
        return "data_plane" if self._session is not None else "wire"

    def generate(self, batch: Mapping[str, torch.Tensor]) -> Supervision:
        """Supervision for a collated batch (`input_ids` int64, `attention_mask`/`loss_mask` [B, T])."""
        try:
            sent = {
                "input_ids": batch["input_ids"].detach().to("cpu", torch.int64),
                "attention_mask": batch["attention_mask"].detach().to("cpu").bool(),
                "loss_mask": batch["loss_mask"].detach().to("cpu").bool(),
            }
        except KeyError as e:
            raise ValueError(
                f"batch lacks {e.args[0]!r} (need input_ids, attention_mask, loss_mask)"
            ) from None
        with self._lock:
            self._ensure_data_plane()
            meta_in = {"target_form": self.target_form, "transport": self.transport}
            meta, tensors = self._post("generate", meta_in, sent)
            if meta.get("transport") == "data_plane":
                try:
                    tensors = self._session.recv(meta["tensors"])
                except (DataPlaneError, KeyError, AttributeError) as e:
                    log.warning("data-plane receive from %s failed, retrying over the wire: %s", self.url, e)
                    self._drop_session()
                    meta, tensors = self._post("generate", {**meta_in, "transport": "wire"}, sent)
            elif meta_in["transport"] == "data_plane":
                log.warning(
                    "serve_target %s answered over the wire: %s", self.url, meta.get("fallback_reason")
                )
        self.last_meta = meta
        if not tensors:
            raise RemoteTargetError(f"serve_target {self.url}/generate: reply carries no tensors")
        try:
            sup = Supervision(**tensors)
        except (TypeError, ValueError) as e:
            raise RemoteTargetError(f"serve_target {self.url}/generate: malformed supervision: {e}") from None
        # The echo guards against mixed-up replies (a proxy, a bug): the ids must be exactly what we sent.
        if not torch.equal(sup.input_ids.cpu(), sent["input_ids"]):
            raise RemoteTargetError(
                f"serve_target {self.url}/generate: token ids in the reply differ from the request"
            )
        return sup.to(self.device) if sup.input_ids.device != self.device else sup

    __call__ = generate

    def close(self) -> None:
        """Drop this client's state on the server and abort the local data-plane end (never hangs)."""
        session, self._session = self._session, None
        try:
            self._post("disconnect", timeout_s=10.0)
        except RemoteTargetError as e:
            log.debug("disconnect: %s", e)
        if session is not None:
            session.close()

    def __enter__(self) -> RemoteTargetClient:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _norm(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, tuple):
        return list(v)
    return v


class FailoverRemoteSource:
    """Supervision from several serve_target servers: this rank's own server while it is healthy, another one
    when it fails (the circuit breakers of `server_pool.ServerPool`), and back once it answers again.

    A batch that fails on a server (unreachable, timed out, garbage) is retried on the next healthy one, so
    no batch is lost or trained twice. A server seen failing is prepared again before its next batch (model
    check, draft vocabulary): a restarted serve_target has forgotten this client. With no server healthy for
    `policy.all_down_timeout_s`, `NoHealthyServerError` ends training. A refusal (HTTP 4xx) that persists
    after re-preparing every server is the batch's or the setup's fault: raised as RemoteTargetError.
    """

    telemetry_kind = REMOTE

    def __init__(
        self,
        urls: list[str],
        make_client: Callable[[str], RemoteTargetClient],
        prepare: Callable[[RemoteTargetClient], None],
        *,
        preferred: int = 0,  # index of this rank's own server in `urls` (server_pool.first_server)
        policy: Any = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        from modelopt_ext.supply.server_pool import ServerPool

        self.urls = list(urls)
        self.preferred = self.urls[preferred % len(self.urls)]
        self.pool = ServerPool(self.urls, start_offset=preferred, policy=policy)
        self._make_client, self._prepare, self._sleep = make_client, prepare, sleep
        self._clients: dict[str, RemoteTargetClient] = {}
        self.url = self.preferred  # the server of the last batch (telemetry counts per server)
        # The trainer points this at its stop-signal check: once asked to stop, a batch no server can answer
        # is given up at once instead of waiting out the grace (the trainer would be killed meanwhile).
        self.stop_requested: Callable[[], bool] = lambda: False

    def client(self, url: str) -> RemoteTargetClient:
        """The prepared client of `url` (made and prepared on first use, and again after a failure)."""
        c = self._clients.get(url)
        if c is None:
            c = self._make_client(url)
            try:
                self._prepare(c)
            except BaseException:
                c.close()
                raise
            self._clients[url] = c
        return c

    def _forget(self, url: str) -> None:
        c = self._clients.pop(url, None)
        if c is not None:
            c.close()

    def server_stats(self) -> dict[str, dict[str, float]]:
        """Per-server counters (requests, errors, latency, bytes, outages) for the trainer's telemetry."""
        return self.pool.stats.snapshot()

    def _choose(self, avoid: set[str]) -> str | None:
        if self.preferred not in avoid and self.preferred in self.pool.healthy():
            return self.preferred
        return self.pool.acquire(avoid)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> Supervision:
        avoid: set[str] = set()
        refused = 0
        while True:
            url = self._choose(avoid)
            if url is None:
                self.pool.check_all_down_timeout()  # raises NoHealthyServerError past the grace
                if self.stop_requested():
                    raise RemoteTargetError("stop requested and every hidden-state server is out of rotation")
                avoid.clear()  # every server failed this batch: any of them may take it once back
                self._sleep(min(max(self.pool.seconds_until_available(), 0.05), 1.0))
                continue
            t0 = time.monotonic()
            try:
                sup = self.client(url)(batch)
            except TargetMismatch:
                raise
            except RemoteTargetError as e:
                self._forget(url)
                if e.status is not None and 400 <= e.status < 500:
                    # Refused: maybe a restart made it forget this client (prepared again next time), maybe
                    # the batch itself; try the others, and give up once every server had its chance.
                    self.pool.release(url)
                    avoid.add(url)
                    refused += 1
                    if refused > len(self.urls):
                        raise
                    continue
                self.pool.record_failure(url, str(e), time.monotonic() - t0)
                avoid.add(url)
                self.pool.check_all_down_timeout()
                if avoid >= set(self.urls):  # every server failed this batch: wait before the next round
                    if self.stop_requested():
                        raise RemoteTargetError(
                            f"stop requested and no hidden-state server answers (last: {e})"
                        )
                    avoid.clear()
                    self._sleep(min(max(self.pool.seconds_until_available(), 0.05), 1.0))
                continue
            nbytes = sum(t.numel() * t.element_size() for t in sup.tensors().values() if t is not None)
            self.pool.record_success(url, time.monotonic() - t0, nbytes)
            self.url = url
            return sup

    def close(self) -> None:
        """Close every server's client."""
        for url in list(self._clients):
            self._forget(url)


def build_remote_source(recipe: Any, env: Any, dataset: Any, pad_id: int, vocab: Any = None) -> Any:
    """The trainer's `SourceSetup` for `data.mode: remote` (serve_target; see supply/sources.py).

    The rank prefers the server `server_pool.first_server` picks (`data.server_urls` is the node's preference
    order: the node's first rank takes the first URL, its other ranks spread over the rest) and fails over to
    the others (FailoverRemoteSource). Each server's model_info is checked against the recipe's target config and
    aux layer ids before it gets a batch; with a draft vocab the server ships `target_probs` over it (Vd/V of
    the logits' bytes, same values `resolve_target` would compute), so no TargetHead is needed. The drafter's
    embeddings are seeded from the preferred server's.
    """
    from functools import partial

    from modelopt_ext.data.dataset import collate_padded
    from modelopt_ext.supply.setup import SourceSetup

    data = recipe.data
    if not data.server_urls:
        raise ValueError("data.server_urls is empty: data.mode 'remote' needs serve_target URLs")
    from modelopt_ext.drafters.layers import recipe_layer_ids
    from modelopt_ext.targets.layers import target_num_layers
    from modelopt_ext.targets.locate import target_config

    cfg = target_config(recipe.model.path, "model.path")
    cfg = cfg.get("text_config") or cfg
    num_layers = target_num_layers(cfg)
    aux = recipe_layer_ids(recipe, num_layers)
    expect = {
        "num_layers": num_layers,
        "hidden_size": int(cfg["hidden_size"]),
        "vocab_size": int(cfg["vocab_size"]),
        "aux_layer_ids": aux,
        "dtype": recipe.model.dtype,
    }

    def make_client(url: str) -> RemoteTargetClient:
        return RemoteTargetClient(
            url,
            token_file=data.auth_token_file,
            target_form="probs" if vocab is not None else "logits",
            device=env.device,
        )

    def prepare(client: RemoteTargetClient) -> None:
        client.model_info(expect=expect)
        if vocab is not None:
            client.set_vocab_mapping(torch.as_tensor(vocab.selected_ids), torch.as_tensor(vocab.t2d))

    from modelopt_ext.supply.server_pool import BreakerPolicy, first_server

    policy = BreakerPolicy(all_down_timeout_s=data.server_grace_s)
    urls = list(data.server_urls)
    start = first_server(len(urls), env.local_rank)
    source = FailoverRemoteSource(urls, make_client, prepare, preferred=start, policy=policy)
    print(
        f"data: rank {env.rank} (local rank {env.local_rank}) prefers serve_target {source.preferred} "
        f"(data.server_urls[{start}] of {len(urls)})",
        flush=True,
    )
    # The preferred server must be there at start (the entry script waited for every server's health).
    first = source.client(source.preferred)
    return SourceSetup(
        dataset=dataset,
        collate=partial(collate_padded, pad_id=pad_id),
        source=source,
        head=None,
        aux_layer_ids=aux,
        target_embeddings=first.input_embeddings().to(env.device),
    )
