"""serve_target over real loopback HTTP and real gloo groups (server in a thread of this process)."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from urllib.parse import urlsplit

import httpx
import pytest
import torch

from modelopt_ext.supply.target_server.auth import read_token_file
from modelopt_ext.supply.target_server.data_plane import DataPlaneServer
from modelopt_ext.supply.target_server.handler import TargetHandler
from modelopt_ext.supply.target_server.http_server import TargetServer
from modelopt_ext.supply.target_server.source import RemoteTargetClient, RemoteTargetError
from modelopt_ext.supply.target_server.wire import CONTENT_TYPE, encode
from modelopt_ext.util.proc import free_port

from .conftest import AUX, HIDDEN, LAYERS, VOCAB, assert_same_supervision, make_batch

EXPECT = {
    "num_layers": LAYERS,
    "hidden_size": HIDDEN,
    "vocab_size": VOCAB,
    "aux_layer_ids": AUX,
    "dtype": "float32",
}


def _raw(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One request on a raw connection: returns (status, headers, body, connection) to probe keep-alive."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read(), conn


@pytest.mark.parametrize("use_data_plane", [False, True], ids=["wire", "gloo"])
def test_parity_with_colocated_bit_for_bit(server, colocated, use_data_plane):
    with RemoteTargetClient(server.url, use_data_plane=use_data_plane) as client:
        client.model_info(expect=EXPECT)
        for seed in range(3):
            batch = make_batch(b=2 + seed, t=9 + 5 * seed, seed=seed)
            assert_same_supervision(client(batch), colocated(batch))
            assert client.last_meta["transport"] == ("data_plane" if use_data_plane else "wire")
        assert client.transport == ("data_plane" if use_data_plane else "wire")


@pytest.mark.parametrize("use_data_plane", [False, True], ids=["wire", "gloo"])
def test_probs_form_and_embeddings_through_both_paths(server, colocated, tiny_model, use_data_plane):
    from types import SimpleNamespace

    from modelopt_ext.targets.head import probs_from_logits

    ids = torch.arange(VOCAB - 1, -1, -3)
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[ids] = True
    with RemoteTargetClient(server.url, use_data_plane=use_data_plane, target_form="probs") as client:
        assert client.set_vocab_mapping(ids, t2d) == ids.numel()
        assert torch.equal(client.input_embeddings(), tiny_model.get_input_embeddings().weight)
        batch = make_batch()
        sup = client(batch)
        ref = colocated(batch)
        assert torch.equal(
            sup.target_probs, probs_from_logits(ref.target_logits, SimpleNamespace(selected_ids=ids, t2d=t2d))
        )
        assert torch.equal(sup.aux_hidden_states, ref.aux_hidden_states)
        assert client.last_meta["bytes_per_sample_probs"] < client.last_meta["bytes_per_sample_logits"]


def test_two_clients_at_once_and_one_disconnecting_leaves_the_other_served(server, colocated):
    a = RemoteTargetClient(server.url, use_data_plane=True)
    b = RemoteTargetClient(server.url, use_data_plane=False)
    errors = []

    def work(client, seed):
        try:
            for i in range(4):
                batch = make_batch(seed=seed * 10 + i)
                assert_same_supervision(client(batch), colocated(batch))
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c, s)) for s, c in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and all(not t.is_alive() for t in threads)
    assert server.handler.dispatch("health").meta["clients"] == 1  # a (data plane); b never stored state
    a.close()
    assert server.handler.data_plane.num_sessions == 0
    batch = make_batch(seed=99)
    assert_same_supervision(b(batch), colocated(batch))
    b.close()
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_a_client_that_vanishes_mid_transfer_does_not_hurt_others(server, colocated):
    """A data-plane client that gets its reply and never receives: the server's send times out, others go on."""
    ghost = RemoteTargetClient(server.url, use_data_plane=True)
    ghost._ensure_data_plane()
    assert ghost.transport == "data_plane"
    # Ask for tensors over the group, then drop the local end without receiving.
    meta, _ = ghost._post("generate", {"transport": "data_plane"}, make_batch(b=4, t=64))
    assert meta["transport"] == "data_plane"
    ghost._session.close()
    other = RemoteTargetClient(server.url, use_data_plane=True)
    batch = make_batch(seed=5)
    assert_same_supervision(other(batch), colocated(batch))
    other.close()


def test_token_auth(tiny_model, token_file, colocated):
    h = TargetHandler(tiny_model, AUX, data_plane=None)
    srv = TargetServer(h, "127.0.0.1", 0, token=read_token_file(token_file))
    srv.start_in_thread()
    try:
        # Liveness stays open (probes carry no token) and reveals nothing beyond "up".
        status, _, body, _ = _raw(srv.url, "GET", "/health")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        for path, method in (
            ("/health", "POST"),
            ("/model_info", "POST"),
            ("/generate", "POST"),
            ("/shutdown", "POST"),
        ):
            status, _headers, body, _ = _raw(srv.url, method, path)
            assert status == 401 and json.loads(body) == {"error": "missing or wrong bearer token"}
            status, _, _, _ = _raw(srv.url, method, path, headers={"Authorization": "Bearer nope"})
            assert status == 401
        with pytest.raises(RemoteTargetError, match="answered 401"):
            RemoteTargetClient(srv.url).model_info()
        with RemoteTargetClient(srv.url, token_file=token_file) as client:
            batch = make_batch()
            assert_same_supervision(client(batch), colocated(batch))
        status, _, body, _ = _raw(
            srv.url, "POST", "/shutdown", headers={"Authorization": "Bearer s3cret-token"}
        )
        assert status == 200 and json.loads(body) == {"shutting_down": True}
        srv._BaseServer__is_shut_down.wait(10)  # serve_forever returned
        assert srv._BaseServer__is_shut_down.is_set()
    finally:
        srv.close()


def test_garbage_gets_a_json_error_and_the_connection_stays_usable(server):
    status, headers, body, conn = _raw(
        server.url, "POST", "/generate", b"\x00garbage" * 10, {"Content-Type": CONTENT_TYPE}
    )
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"].startswith("bad tensor body: not a tensor message")
    # Same connection, next request: it was not dropped.
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    cases = [
        ("POST", "/generate", b"{not json", {"Content-Type": "application/json"}, 400, "not JSON"),
        ("POST", "/generate", b"x", {"Content-Type": "text/plain"}, 415, "Content-Type"),
        (
            "POST",
            "/generate",
            encode({"input_ids": torch.zeros(2)}),
            {"Content-Type": CONTENT_TYPE},
            400,
            "needs",
        ),
        ("POST", "/nope", b"", {}, 404, "no route"),
        ("GET", "/generate", b"", {}, 405, "no route"),
        (
            "POST",
            "/generate",
            b"{}",
            {"Content-Type": "application/json", "X-Modelopt-Meta": "{"},
            400,
            "header",
        ),
    ]
    for method, path, payload, hdrs, want, fragment in cases:
        status, headers, body, _ = _raw(server.url, method, path, payload, hdrs)
        assert status == want and fragment in json.loads(body)["error"], (path, body)


def test_truncated_body_is_refused(server):
    u = urlsplit(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: 1000\r\n\r\nabc"
            % CONTENT_TYPE.encode()
        )
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):  # the server closes after answering
            data += chunk
    assert data.startswith(b"HTTP/1.1 400") and b"body truncated" in data


def test_model_info_mismatch_is_refused_with_one_line(server):
    with RemoteTargetClient(server.url, use_data_plane=False) as client:
        with pytest.raises(RemoteTargetError) as e:
            client.model_info(expect={**EXPECT, "aux_layer_ids": [2, 3, 4], "hidden_size": 4096})
        msg = str(e.value)
        assert (
            "\n" not in msg
            and "aux_layer_ids server=[1, 2, 3] expected=[2, 3, 4]" in msg
            and "hidden_size" in msg
        )
        with pytest.raises(ValueError, match="unknown fields"):
            client.model_info(expect={"layers": 4})


def test_fallback_to_wire_when_the_store_port_is_taken(tiny_model, colocated, caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        h = TargetHandler(tiny_model, AUX, data_plane=DataPlaneServer("127.0.0.1", busy.getsockname()[1]))
        srv = TargetServer(h, "127.0.0.1", 0)
        srv.start_in_thread()
        try:
            with caplog.at_level(logging.WARNING), RemoteTargetClient(srv.url, use_data_plane=True) as client:
                batch = make_batch()
                assert_same_supervision(client(batch), colocated(batch))
                assert client.transport == "wire" and client.last_meta["transport"] == "wire"
            assert any(
                "offers no data plane" in r.getMessage() and "cannot host the store" in r.getMessage()
                for r in caplog.records
            )
        finally:
            srv.close()


def test_fallback_to_wire_when_the_group_cannot_form(server, colocated, caplog, monkeypatch):
    """The server's store answers but the client cannot reach it (a firewalled port): the client times out
    forming the group, logs, closes the half-open session on the server, and uses the wire format."""
    import modelopt_ext.supply.target_server.data_plane as dp

    real = dp.ClientSession.__init__

    def unreachable(self, server_host, reply, device="cpu"):
        real(
            self,
            server_host,
            {**reply, "store_port": free_port(), "handshake_timeout_s": 1},  # nothing listens on it
            device=device,
        )

    monkeypatch.setattr(dp.ClientSession, "__init__", unreachable)
    with caplog.at_level(logging.WARNING), RemoteTargetClient(server.url, use_data_plane=True) as client:
        batch = make_batch()
        assert_same_supervision(client(batch), colocated(batch))
        assert client.transport == "wire"
        assert server.handler.data_plane.num_sessions == 0  # the half-open session was closed
    assert any(
        "data plane to" in r.getMessage() and "using the wire format" in r.getMessage()
        for r in caplog.records
    )


def test_env_zero_forces_the_wire(server, colocated, monkeypatch):
    monkeypatch.setenv("MODELOPT_EXT_ENABLE_NCCL", "0")
    with RemoteTargetClient(server.url, use_data_plane=True) as client:
        batch = make_batch()
        assert_same_supervision(client(batch), colocated(batch))
        assert client.transport == "wire"
    assert server.handler.data_plane.num_sessions == 0
    # And the server side alone refuses too.
    assert server.handler.dispatch("init_nccl", {"backend": "gloo"}, None, "c").meta["data_plane"] is False


def test_shutdown_without_token_is_loopback_only_and_stops_the_server(tiny_model):
    srv = TargetServer(TargetHandler(tiny_model, AUX, compute=lambda b: None), "127.0.0.1", 0)
    t = srv.start_in_thread()
    status, _, _body, _ = _raw(srv.url, "POST", "/shutdown")
    assert status == 200
    t.join(timeout=10)
    assert not t.is_alive()
    srv.close()


def test_gloo_binds_where_the_client_reached_a_server_listening_on_all_interfaces(tiny_model, colocated):
    h = TargetHandler(tiny_model, AUX, data_plane=DataPlaneServer("0.0.0.0", 0, handshake_timeout_s=10))
    srv = TargetServer(h, "0.0.0.0", 0)
    srv.start_in_thread()
    try:
        with RemoteTargetClient(f"http://127.0.0.1:{srv.server_address[1]}", use_data_plane=True) as client:
            batch = make_batch()
            assert_same_supervision(client(batch), colocated(batch))
            assert client.transport == "data_plane"
    finally:
        srv.close()
