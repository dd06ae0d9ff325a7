"""Request handling for serve_target, as a plain class: no sockets, no HTTP (the HTTP layer is `http.py`).

`TargetHandler.dispatch(endpoint, meta, tensors, client_id)` returns a `Reply` (JSON-able metadata, optional
tensors, a status). Validation problems become 4xx replies with `{"error": "<one line>"}`, anything else a 500
with the message: a request never kills the server or another client's state.

Supervision is computed by exactly the colocated code path (`ColocatedSource`, or an injected callable with
the same contract), so `serve_target` output equals colocated output bit for bit. The model forward is
serialised with a lock (several trainer ranks may share one server); everything else runs concurrently.

Per-client state (vocab mapping, data-plane session) is keyed by the `client_id` each client sends; one
client's `disconnect` drops only its own state.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from modelopt_ext.supply.target_server.data_plane import (
    DataPlaneError,
    DataPlaneServer,
    ServerSession,
    tensor_specs,
)
from modelopt_ext.supply.target_server.wire import VERSION as WIRE_VERSION
from modelopt_ext.targets.head import probs_from_logits
from modelopt_ext.targets.supervision import Supervision

log = logging.getLogger("modelopt_ext.supply.target_server")

ComputeFn = Callable[[dict[str, torch.Tensor]], Supervision]
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
TARGET_FORMS = ("logits", "probs")


class RequestError(Exception):
    """A bad request: the reply is `{"error": message}` with `status` (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Reply:
    """What a handler method returns; the HTTP layer serialises it.

    `tensors` go in a wire-format body, unless `session` is set: then the body is JSON metadata including
    `meta["tensors"]` (the specs) and the HTTP layer calls `after_response()` once the reply is flushed.
    """

    meta: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor | None] | None = None
    status: int = 200
    session: ServerSession | None = None

    def after_response(self) -> None:
        """Send the tensors over the data plane (no-op for wire replies)."""
        if self.session is not None and self.tensors is not None:
            self.session.send(self.tensors)


def check_aux_layer_ids(num_layers: int, aux_layer_ids: list[int] | None) -> list[int]:
    """The drafter layer ids the server captures (targets/layers.py decides; default drafter's rule if None)."""
    from modelopt_ext.drafters.layers import drafter_layer_ids

    return drafter_layer_ids(num_layers, aux_layer_ids)


@dataclass
class _ClientState:
    selected_ids: torch.Tensor | None = None  # int64 [Vd] on the model device
    t2d: torch.Tensor | None = None  # bool [V] on the model device
    session: ServerSession | None = None


class TargetHandler:
    """The frozen target plus the request logic of serve_target."""

    def __init__(
        self,
        model: torch.nn.Module,
        aux_layer_ids: list[int] | None = None,
        *,
        compute: ComputeFn | None = None,
        model_name: str = "",
        data_plane: DataPlaneServer | None = None,
        max_batch_tokens: int = 1 << 20,
    ):
        cfg = model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.num_layers = int(cfg.num_hidden_layers)
        self.hidden_size = int(cfg.hidden_size)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.aux_layer_ids = check_aux_layer_ids(self.num_layers, aux_layer_ids)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.model_name = model_name
        if compute is None:
            from modelopt_ext.supply.colocated import ColocatedSource

            compute = ColocatedSource(model, self.aux_layer_ids)
        self.compute = compute
        self.data_plane = data_plane
        self.max_batch_tokens = max_batch_tokens
        self._forward_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._clients: dict[str, _ClientState] = {}
        self.requests_served = 0

    # ---- dispatch -------------------------------------------------------------------------------------

    ENDPOINTS = (
        "health",
        "model_info",
        "input_embeddings",
        "set_vocab_mapping",
        "generate",
        "init_nccl",
        "disconnect",
    )

    def dispatch(
        self,
        endpoint: str,
        meta: Mapping | None = None,
        tensors: Mapping[str, torch.Tensor | None] | None = None,
        client_id: str | None = None,
    ) -> Reply:
        """Run one request; never raises (errors become 4xx/500 replies)."""
        try:
            if endpoint not in self.ENDPOINTS:
                raise RequestError(f"unknown endpoint {endpoint!r}; known: {', '.join(self.ENDPOINTS)}", 404)
            if client_id is not None and not _CLIENT_ID.match(client_id):
                raise RequestError("client id must be 1-128 characters of [A-Za-z0-9_.-]")
            meta = dict(meta or {})
            return getattr(self, endpoint)(meta=meta, tensors=dict(tensors or {}), client_id=client_id)
        except RequestError as e:
            return Reply({"error": str(e)}, status=e.status)
        except Exception as e:
            log.exception("%s failed", endpoint)
            first = (str(e).splitlines() or [""])[0]
            return Reply({"error": f"internal error in {endpoint}: {type(e).__name__}: {first}"}, status=500)

    # ---- endpoints ------------------------------------------------------------------------------------

    def health(self, **_) -> Reply:
        """Liveness plus a little load information."""
        with self._state_lock:
            clients = len(self._clients)
        return Reply({"status": "ok", "clients": clients, "requests_served": self.requests_served})

    def info(self) -> dict:
        """The model facts a client checks against its recipe."""
        return {
            "model": self.model_name,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "aux_layer_ids": list(self.aux_layer_ids),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "wire_version": WIRE_VERSION,
            "max_batch_tokens": self.max_batch_tokens,
            "data_plane": self.data_plane is not None,
        }

    def model_info(self, **_) -> Reply:
        """`info()` as a reply."""
        return Reply(self.info())

    def input_embeddings(self, **_) -> Reply:
        """The target's input embedding [V, H], to seed the drafter's embedding."""
        w = self.model.get_input_embeddings().weight.detach()
        return Reply(
            {"shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch.")}, {"embed_tokens": w}
        )

    def set_vocab_mapping(self, *, tensors: dict, client_id: str | None, **_) -> Reply:
        """Register this client's draft vocabulary: `selected_token_ids` int64 [Vd] and/or `t2d` bool [V]."""
        if client_id is None:
            raise RequestError("set_vocab_mapping needs a client id (X-Modelopt-Client header)")
        ids, t2d = tensors.get("selected_token_ids"), tensors.get("t2d")
        if ids is None and t2d is None:
            raise RequestError("set_vocab_mapping needs selected_token_ids (int64 [Vd]) or t2d (bool [V])")
        V = self.vocab_size
        if t2d is not None and (t2d.dtype != torch.bool or tuple(t2d.shape) != (V,)):
            raise RequestError(f"t2d must be bool [{V}], got {t2d.dtype} {list(t2d.shape)}")
        if ids is not None:
            if ids.dtype != torch.int64 or ids.dim() != 1 or ids.numel() == 0:
                raise RequestError(
                    f"selected_token_ids must be int64 [Vd], got {ids.dtype} {list(ids.shape)}"
                )
            if int(ids.min()) < 0 or int(ids.max()) >= V:
                raise RequestError(f"selected_token_ids outside [0, {V})")
            if torch.unique(ids).numel() != ids.numel():
                raise RequestError("selected_token_ids has duplicates")
            if t2d is not None and (int(t2d.sum()) != ids.numel() or not bool(t2d[ids].all())):
                raise RequestError("t2d does not mark exactly the selected_token_ids")
        else:
            ids = torch.nonzero(t2d).flatten()
            if ids.numel() == 0:
                raise RequestError("t2d selects no token")
        mask = torch.zeros(V, dtype=torch.bool)
        mask[ids] = True
        with self._state_lock:
            st = self._clients.setdefault(client_id, _ClientState())
            st.selected_ids = ids.clone().to(self.device)
            st.t2d = mask.to(self.device)
        return Reply({"draft_vocab_size": int(ids.numel())})

    def _check_batch(self, tensors: dict) -> dict[str, torch.Tensor]:
        missing = [k for k in ("input_ids", "attention_mask", "loss_mask") if tensors.get(k) is None]
        if missing:
            raise RequestError(f"generate needs tensors {missing}")
        ids = tensors["input_ids"]
        if ids.dtype != torch.int64 or ids.dim() != 2 or ids.numel() == 0:
            raise RequestError(f"input_ids must be non-empty int64 [B, T], got {ids.dtype} {list(ids.shape)}")
        for k in ("attention_mask", "loss_mask"):
            t = tensors[k]
            if t.dtype != torch.bool or t.shape != ids.shape:
                raise RequestError(f"{k} must be bool {list(ids.shape)}, got {t.dtype} {list(t.shape)}")
        if ids.numel() > self.max_batch_tokens:
            raise RequestError(
                f"batch has {ids.numel()} tokens, this server takes at most {self.max_batch_tokens}", 413
            )
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise RequestError(f"input_ids outside [0, {self.vocab_size})")
        return {k: tensors[k].to(self.device) for k in ("input_ids", "attention_mask", "loss_mask")}

    def generate(self, *, meta: dict, tensors: dict, client_id: str | None, **_) -> Reply:
        """Supervision for one collated batch, computed by the colocated code path.

        meta: `target_form` ("logits" = exactly colocated; "probs" = `probs_from_logits` over the client's draft
        vocab, what the trainer would compute from the logits, at Vd/V of the bytes), `transport` ("wire" or
        "data_plane").
        """
        form = meta.get("target_form", "logits")
        if form not in TARGET_FORMS:
            raise RequestError(f"target_form must be one of {list(TARGET_FORMS)}, got {form!r}")
        transport = meta.get("transport", "wire")
        if transport not in ("wire", "data_plane"):
            raise RequestError(f"transport must be 'wire' or 'data_plane', got {transport!r}")
        batch = self._check_batch(tensors)
        with self._state_lock:
            st = self._clients.get(client_id) if client_id else None
            selected, t2d = (st.selected_ids, st.t2d) if st else (None, None)
            session = st.session if st else None
        if form == "probs" and selected is None:
            raise RequestError("target_form 'probs' needs set_vocab_mapping first", 409)

        t0 = time.perf_counter()
        with self._forward_lock, torch.no_grad():
            sup = self.compute(batch)
        compute_s = time.perf_counter() - t0
        logits = sup.target_logits
        if form == "probs":
            if logits is None:
                raise RuntimeError("the compute function returned no target_logits; cannot make probs")
            # The trainer's own function: rows whose argmax is outside the draft vocab come back all-zero, and
            # `resolve_target` masks exactly those, so the mask matches a colocated run's.
            sup = Supervision(
                input_ids=sup.input_ids,
                attention_mask=sup.attention_mask,
                loss_mask=sup.loss_mask,
                aux_hidden_states=sup.aux_hidden_states,
                target_probs=probs_from_logits(logits, SimpleNamespace(selected_ids=selected, t2d=t2d)),
            )
        out = sup.tensors()
        b = int(sup.input_ids.shape[0])
        nbytes = sup.nbytes()
        reply_meta = {
            "target_form": form,
            "batch_size": b,
            "num_tokens": sup.num_tokens,
            "bytes": nbytes,
            "bytes_per_sample": nbytes / b,
            "compute_s": compute_s,
        }
        if logits is not None and selected is not None:
            # What the two forms cost per sample, so a user can pick (measured, not guessed).
            sent = out["target_probs" if form == "probs" else "target_logits"]
            base = nbytes - sent.numel() * sent.element_size()
            per_pos = logits.shape[0] * logits.shape[1]
            reply_meta["bytes_per_sample_logits"] = (
                base + per_pos * logits.shape[-1] * logits.element_size()
            ) / b
            reply_meta["bytes_per_sample_probs"] = (base + per_pos * selected.numel() * 4) / b
        with self._state_lock:
            self.requests_served += 1
        if transport == "data_plane":
            if session is None:
                reply_meta["transport"] = "wire"
                reply_meta["fallback_reason"] = "no data-plane session (call init_nccl)"
            elif not session.usable(wait_s=5.0):
                reply_meta["transport"] = "wire"
                reply_meta["fallback_reason"] = (
                    f"data-plane session unusable: {session.error or 'not formed'}"
                )
            else:
                if session.backend != "nccl":
                    out = {k: (v.cpu() if v is not None else None) for k, v in out.items()}
                reply_meta["transport"] = "data_plane"
                reply_meta["tensors"] = tensor_specs(out)
                return Reply(reply_meta, out, session=session)
        else:
            reply_meta["transport"] = "wire"
        return Reply(reply_meta, out)

    def init_nccl(self, *, meta: dict, client_id: str | None, **_) -> Reply:
        """Open a data-plane session for this client (`meta["backend"]`: "nccl" or "gloo").

        `meta["server_addr"]` (set by the HTTP layer, never by the client): the local address the request
        arrived on, where the server's end of a gloo group binds when it listens on all interfaces.

        Replies `{"data_plane": false, "reason": ...}` (200) when the server cannot offer one: the client then
        uses the wire format.
        """
        if client_id is None:
            raise RequestError("init_nccl needs a client id (X-Modelopt-Client header)")
        backend = meta.get("backend", "gloo")
        if backend not in ("nccl", "gloo"):
            raise RequestError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
        if self.data_plane is None:
            return Reply({"data_plane": False, "reason": "this server has no data plane"})
        with self._state_lock:
            st = self._clients.setdefault(client_id, _ClientState())
            old, st.session = st.session, None
        if old is not None:
            self.data_plane.close(old.id)
        try:
            session, info = self.data_plane.open(backend, meta.get("server_addr"))
        except DataPlaneError as e:
            return Reply({"data_plane": False, "reason": str(e)})
        with self._state_lock:
            self._clients.setdefault(client_id, _ClientState()).session = session
        return Reply({"data_plane": True, **info})

    def disconnect(self, *, meta: dict, client_id: str | None, **_) -> Reply:
        """Drop this client's state (vocab mapping, data-plane session); other clients are untouched.

        `meta["data_plane_only"]`: close only the data-plane session (the client fell back to the wire).
        """
        if client_id is None:
            raise RequestError("disconnect needs a client id (X-Modelopt-Client header)")
        with self._state_lock:
            if meta.get("data_plane_only"):
                st = self._clients.get(client_id)
                session, st_session = (st.session, None) if st else (None, None)
                if st is not None:
                    st.session = st_session
                st = _ClientState(session=session) if session else None
            else:
                st = self._clients.pop(client_id, None)
            remaining = len(self._clients)
        if st is not None and st.session is not None and self.data_plane is not None:
            self.data_plane.close(st.session.id)
        return Reply({"disconnected": st is not None, "clients": remaining})

    def close(self) -> None:
        """Tear down every data-plane session (server shutdown)."""
        if self.data_plane is not None:
            self.data_plane.close_all()
