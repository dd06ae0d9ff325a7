"""Regeneration through OpenAI-compatible chat servers: order and ids kept, every assistant turn replaced in
order with the conversation so far, failover when a server dies mid-run (nothing lost or duplicated), resume
after an interruption, thinking output kept, bad input as one line. Servers: small loopback HTTP servers
speaking chat/completions (the real-vLLM path runs in examples/local/regen_eagle3.yaml)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from modelopt_ext.regenerate import main
from modelopt_ext.supply.regenerate import GenOptions, RegenError, regenerate
from modelopt_ext.supply.server_pool import BreakerPolicy

FAST = BreakerPolicy(failure_threshold=1, cooldown_s=0.05, max_cooldown_s=0.1, all_down_timeout_s=2.0)


class ChatServer:
    """Answers each chat request with `"<name>: <last user text>"`; `die_after` closes it after N answers."""

    def __init__(
        self, name: str, die_after: int | None = None, reasoning: bool = False, refuse: str | None = None
    ):
        self.name, self.die_after, self.reasoning, self.refuse = name, die_after, reasoning, refuse
        self.answered: list[list[dict]] = []
        self.lock = threading.Lock()
        srv = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "tiny"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with srv.lock:
                    if srv.die_after is not None and len(srv.answered) >= srv.die_after:
                        threading.Thread(target=srv.kill, daemon=True).start()
                        self.connection.close()
                        return
                    srv.answered.append(body["messages"])
                last = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
                if srv.refuse and srv.refuse in last:
                    return self._send(400, {"error": "prompt too long"})
                words = f"{srv.name}: {last}".split()
                hit = len(words) > body["max_tokens"]
                msg = {"role": "assistant", "content": " ".join(words[: body["max_tokens"]])}
                if srv.reasoning:
                    msg["reasoning_content"] = "thinking about " + last
                self._send(
                    200,
                    {
                        "choices": [{"message": msg, "finish_reason": "length" if hit else "stop"}],
                        "usage": {"completion_tokens": min(len(words), body["max_tokens"])},
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def kill(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _data(path: Path, n: int = 10) -> Path:
    rows = []
    for i in range(n):
        if i % 2:
            rows.append(
                {
                    "id": f"c{i}",
                    "conversations": [
                        {"from": "human", "value": f"q{i}a"},
                        {"from": "gpt", "value": "old"},
                        {"from": "human", "value": f"q{i}b"},
                        {"from": "gpt", "value": "old"},
                    ],
                }
            )
        else:
            rows.append(
                {
                    "id": f"c{i}",
                    "messages": [
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": "old"},
                    ],
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_turns_regenerated_in_order_ids_kept_and_a_dying_server_loses_nothing(tmp_path):
    a, b = ChatServer("A", die_after=4), ChatServer("B")
    data = _data(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    s = regenerate(data, out, [a.url, b.url], concurrency=3, part_size=3, log=lambda m: None, policy=FAST)
    rows = _rows(out)
    assert [r["id"] for r in rows] == [f"c{i}" for i in range(10)]
    for i, r in enumerate(rows):
        if i % 2:
            turns = r["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
            assert turns[1]["value"].endswith(f"q{i}a") and turns[3]["value"].endswith(f"q{i}b")
        else:
            assert r["messages"][0] == {"role": "system", "content": "be brief"}
            assert r["messages"][2]["content"].endswith(f"q{i}")
    # the second turn was generated with the regenerated first one in its history
    second_turn_requests = [m for m in b.answered + a.answered if len(m) == 3 and m[0]["role"] == "user"]
    assert all(m[1]["content"].split(":")[0] in ("A", "B") for m in second_turn_requests)
    assert len(a.answered) == 4 and s["failures"] == 0 and s["assistant_turns"] == 15
    assert len(a.answered) + len(b.answered) == 15  # every turn answered exactly once
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["conversations"] == 10 and summary["tokens"] == s["tokens"] > 0


def test_restart_continues_from_finished_parts(tmp_path):
    srv = ChatServer("A")
    data = _data(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    regenerate(data, out, [srv.url], part_size=4, log=lambda m: None)
    first = out.read_text()
    n = len(srv.answered)
    (tmp_path / "out.jsonl.parts" / "part-000000008.jsonl").unlink()  # as if killed in the last part
    out.unlink()
    s = regenerate(data, out, [srv.url], part_size=4, log=lambda m: None)
    assert s["regenerated_now"] == 2 and len(srv.answered) == n + 3
    assert out.read_text() == first


def test_all_servers_down_stops_in_one_line_and_a_rerun_continues(tmp_path):
    srv = ChatServer("A", die_after=3)  # answers the first part (3 turns), then dies
    data = _data(tmp_path / "in.jsonl", n=4)
    out = tmp_path / "out.jsonl"
    with pytest.raises(RegenError, match="healthy") as e:
        regenerate(data, out, [srv.url], part_size=2, concurrency=1, log=lambda m: None, policy=FAST)
    assert "\n" not in str(e.value) and "rerun" in str(e.value)
    assert not out.exists() and [p.name for p in (tmp_path / "out.jsonl.parts").iterdir()] == [
        "part-000000000.jsonl"
    ]
    new = ChatServer("B")
    s = regenerate(data, out, [new.url], part_size=2, log=lambda m: None)
    assert s["regenerated_now"] == 2 and len(new.answered) == 3 and len(_rows(out)) == 4


def test_a_conversation_every_server_refuses_is_kept_and_counted(tmp_path):
    srv = ChatServer("A", refuse="q1")
    data = _data(tmp_path / "in.jsonl", n=3)
    out = tmp_path / "out.jsonl"
    s = regenerate(data, out, [srv.url], opts=GenOptions(max_attempts=2), log=lambda m: None)
    rows = _rows(out)
    assert s["failures"] == 1 and rows[1] == _rows(data)[1] and rows[2]["messages"][2]["content"] == "A: q2"


def test_max_tokens_and_thinking_are_reported_and_kept(tmp_path):
    srv = ChatServer("A", reasoning=True)
    data = _data(tmp_path / "in.jsonl", n=2)
    out = tmp_path / "out.jsonl"
    s = regenerate(data, out, [srv.url], opts=GenOptions(max_tokens=1), log=lambda m: None)
    rows = _rows(out)
    assert s["hit_max_tokens"] == 3 and rows[0]["messages"][2]["content"] == "A:"
    assert rows[0]["messages"][2]["reasoning_content"] == "thinking about q0"
    s = regenerate(
        data, tmp_path / "o2.jsonl", [srv.url], opts=GenOptions(thinking="drop"), log=lambda m: None
    )
    assert "reasoning_content" not in _rows(tmp_path / "o2.jsonl")[0]["messages"][2]


def test_bad_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert (
        main(["--data", str(bad), "--out", str(tmp_path / "o.jsonl"), "--servers", "http://127.0.0.1:9"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}: line 1: no non-empty assistant turn (nothing to learn)"]
    with pytest.raises(RegenError):
        regenerate(
            tmp_path / "missing.jsonl", tmp_path / "o.jsonl", ["http://127.0.0.1:9"], log=lambda m: None
        )


def test_two_nodes_share_the_parts_and_the_last_assembles(tmp_path):
    a, b = ChatServer("A"), ChatServer("B")
    data = _data(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    s1 = regenerate(data, out, [b.url], part_size=3, rank=1, world_size=2, log=lambda m: None)
    assert not s1["complete"] and not out.exists() and s1["regenerated_now"] == 4  # parts 3..5 and 9
    s0 = regenerate(data, out, [a.url], part_size=3, rank=0, world_size=2, log=lambda m: None)
    assert s0["complete"] and s0["regenerated_now"] == 6
    assert [r["id"] for r in _rows(out)] == [f"c{i}" for i in range(10)]
