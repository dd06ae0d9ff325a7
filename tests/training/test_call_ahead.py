"""Remote supervision fetched ahead of the step (supply/call_ahead.py, `data.call_ahead`): same batches, same
training, exact resume; the fetch runs in its own thread and its latency is still counted per server."""

from __future__ import annotations

import json
import threading
import time

import pytest
from standin import StandinTarget, standin_parts
from test_resume import _assert_identical, _final_weights, _recipe

from modelopt_ext.config.recipe import parse_recipe
from modelopt_ext.supply.call_ahead import CallAhead
from modelopt_ext.training.trainer import STOP_ENV, train


class _Source:
    def __init__(self, fail_at=None, delay=0.0):
        self.calls, self.threads, self.fail_at, self.delay = [], set(), fail_at, delay
        self.url = "http://a:1"

    def __call__(self, b):
        self.calls.append(b)
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if b == self.fail_at:
            raise RuntimeError(f"server refused batch {b}")
        self.url = f"http://s{b % 2}:1"
        return b * 10


def test_call_ahead_keeps_order_and_names_the_server_per_batch():
    src = _Source()
    out = list(CallAhead(range(6), src, prepare=lambda b: b + 100, depth=2))
    assert [o[0] for o in out] == list(range(100, 106)) and [o[1] for o in out] == [b * 10 for b in range(100, 106)]
    assert [o[3] for o in out] == [f"http://s{b % 2}:1" for b in range(100, 106)]  # not the source's latest url
    assert all(o[2] >= 0 for o in out) and src.threads == {"supervision-call-ahead"}


def test_an_error_surfaces_at_its_batch_and_an_early_stop_stops_fetching():
    got = []
    with pytest.raises(RuntimeError, match="server refused batch 3"):
        for item in CallAhead(range(10), _Source(fail_at=3)):
            got.append(item[0])
    assert got == [0, 1, 2]

    src = _Source(delay=0.01)
    stream = iter(CallAhead(range(1000), src, depth=2))
    assert [next(stream)[0] for _ in range(3)] == [0, 1, 2]
    stream.close()
    time.sleep(0.1)
    assert len(src.calls) <= 3 + 2 + 1  # consumed + queue depth + the one in flight
    assert not any(t.name == "supervision-call-ahead" for t in threading.enumerate())


class _RemoteStandin(StandinTarget):
    """The stand-in target as a remote source would present itself (telemetry kind, server url, latency)."""

    telemetry_kind = "remote"
    url = "http://standin:8000"
    threads: set = set()

    def __call__(self, batch):
        _RemoteStandin.threads.add(threading.current_thread().name)
        time.sleep(0.005)
        return super().__call__(batch)


def _remote_parts(recipe, env, resume_from):
    parts = standin_parts(recipe, env, resume_from)
    parts.source = _RemoteStandin()
    return parts


def _remote_recipe(out, call_ahead):
    r = _recipe(out)
    r["data"]["call_ahead"] = call_ahead
    return r


def test_trainer_with_call_ahead_trains_the_same_and_resumes_exactly(tmp_path, monkeypatch):
    _RemoteStandin.threads = set()
    inline = train(parse_recipe(_remote_recipe(tmp_path / "inline", 0)), _remote_parts)
    assert _RemoteStandin.threads == {"MainThread"}
    _RemoteStandin.threads = set()
    ahead = train(parse_recipe(_remote_recipe(tmp_path / "ahead", 2)), _remote_parts)
    assert _RemoteStandin.threads == {"supervision-call-ahead"}
    assert inline.global_step == ahead.global_step == 14
    _assert_identical(_final_weights(tmp_path / "inline"), _final_weights(tmp_path / "ahead"))

    # Stopped after step 6 with batches already fetched ahead, then resumed: still the same weights.
    monkeypatch.setenv(STOP_ENV, "5")
    cut = train(parse_recipe(_remote_recipe(tmp_path / "cut", 2)), _remote_parts)
    assert cut.stopped_early and cut.global_step == 6
    monkeypatch.delenv(STOP_ENV)
    resumed = train(parse_recipe(_remote_recipe(tmp_path / "cut", 2)), _remote_parts)
    assert resumed.global_step == 14
    _assert_identical(_final_weights(tmp_path / "inline"), _final_weights(tmp_path / "cut"))

    # Telemetry still counts one request per micro-batch trained on the server, with its latency.
    m = json.loads((tmp_path / "ahead" / "metrics.json").read_text())
    server = m["servers"]["http://standin:8000"]
    assert server["requests"] == 14 * 2  # 14 steps x grad_accum 2
    assert server["lat_mean_ms"] >= 5.0
