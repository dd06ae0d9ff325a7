"""The data plane on its own: real 2-rank gloo groups on loopback, every dtype as uint8 views, teardown."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from modelopt_ext.supply.target_server import data_plane as dp
from modelopt_ext.supply.target_server.wire import SUPPORTED_DTYPES


@pytest.fixture
def pair():
    """(server session, client session) over a real gloo group on loopback."""
    srv = dp.DataPlaneServer("127.0.0.1", 0, handshake_timeout_s=10, op_timeout_s=3)
    session, reply = srv.open("gloo")
    client = dp.ClientSession("127.0.0.1", reply)
    assert session.usable(wait_s=10) and reply["backend"] == "gloo"
    yield session, client
    client.close()
    srv.close_all()


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _msg() -> dict:
    out = {}
    for i, dtype in enumerate(SUPPORTED_DTYPES):
        t = torch.arange(24, dtype=torch.float64).view(2, 3, 4) * (1 if i % 2 else -1)
        out[f"t_{dtype}"] = (t % 2).bool() if dtype == torch.bool else t.to(dtype)
    out["scalar"] = torch.tensor(7, dtype=torch.int16)
    out["empty"] = torch.empty(0, 5, dtype=torch.bfloat16)
    out["none"] = None
    out["strided"] = torch.arange(30, dtype=torch.int8).view(5, 6).t()
    return out


def test_every_dtype_crosses_a_real_gloo_group(pair):
    server, client = pair
    msg = _msg()
    specs = dp.tensor_specs(msg)
    assert {s["key"]: s.get("dtype") for s in specs}["t_torch.int16"] == "int16"
    for _ in range(2):  # twice: tags restart per message and still pair up in order
        t = threading.Thread(target=server.send, args=(msg,))
        t.start()
        got = client.recv(specs)
        t.join(10)
        assert list(got) == list(msg)
        for k, v in msg.items():
            if v is None:
                assert got[k] is None
            else:
                assert got[k].dtype == v.dtype and got[k].shape == v.shape
                assert _bytes(got[k]) == _bytes(v), k


def test_send_to_a_gone_peer_fails_within_the_timeout_and_marks_the_session(pair):
    server, client = pair
    client.close()
    t0 = time.monotonic()
    with pytest.raises(dp.DataPlaneError, match="send failed"):
        server.send({"x": torch.zeros(1 << 20)})
    assert time.monotonic() - t0 < 10
    assert not server.usable()


def test_a_peer_that_never_comes_fails_the_handshake_within_its_timeout():
    srv = dp.DataPlaneServer("127.0.0.1", 0, handshake_timeout_s=1)
    session, _ = srv.open("gloo")
    assert not session.usable(wait_s=15)
    assert "did not form" in session.error
    srv.close_all()


def test_allocate_refuses_malformed_specs():
    with pytest.raises(dp.DataPlaneError, match="malformed"):
        dp.allocate([{"key": "x", "dtype": "float128", "shape": [1]}], "cpu")
    with pytest.raises(dp.DataPlaneError, match="malformed"):
        dp.allocate([{"key": "x", "dtype": "float32", "shape": [-1]}], "cpu")


def test_env_switches(monkeypatch):
    monkeypatch.delenv(dp.ENV_ENABLE, raising=False)
    monkeypatch.delenv(dp.ENV_PORT, raising=False)
    assert dp.data_plane_enabled() and dp.store_port(8000) == 8100
    monkeypatch.setenv(dp.ENV_ENABLE, "0")
    monkeypatch.setenv(dp.ENV_PORT, "9123")
    assert not dp.data_plane_enabled() and dp.store_port(8000) == 9123
    monkeypatch.setenv(dp.ENV_PORT, "http")
    with pytest.raises(dp.DataPlaneError, match="MODELOPT_EXT_NCCL_PORT"):
        dp.store_port(8000)
    monkeypatch.setenv(dp.ENV_PORT, "70000")
    with pytest.raises(dp.DataPlaneError, match="not a port number"):
        dp.store_port(8000)
