"""The streaming dataset against real HTTP: vLLM-like servers on loopback writing real files under the lock protocol.

Covers exact values and collation, the lock protocol, path confinement (absolute escape, `..`, symlinks),
token-id mismatch, retries of 5xx and truncated files, a server dying mid-epoch with DataLoader workers
(every sample delivered exactly once), all servers dead (one clear line), auth, and per-server counters.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter

import pytest
import torch
from fake_vllm import MODEL_ID, FakeVllmServer, expected_hidden, spawn
from torch.utils.data import DataLoader, DistributedSampler

from modelopt_ext.supply.server_pool import BreakerPolicy
from modelopt_ext.supply.vllm.source import (
    StreamingError,
    StreamingOptions,
    VllmStreamingDataset,
    collate_supervision,
)
from modelopt_ext.targets.supervision import Supervision

N_LAYERS, HIDDEN = 4, 8  # 3 aux layers + the last one


def conversations(n: int) -> list[dict[str, torch.Tensor]]:
    """n samples with distinct first tokens (100 + i) and varied lengths."""
    out = []
    for i in range(n):
        length = 5 + (i * 7) % 13
        ids = torch.tensor(
            [100 + i] + [(i * 31 + j * 17) % 500 + 1 for j in range(length - 1)], dtype=torch.long
        )
        mask = torch.zeros(length, dtype=torch.bool)
        mask[length // 2 :] = True
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


FAST = StreamingOptions(
    request_timeout_s=10,
    connect_timeout_s=2,
    lock_timeout_s=5,
    max_attempts_per_sample=8,
    backoff_base_s=0.005,
    backoff_max_s=0.05,
    breaker=BreakerPolicy(failure_threshold=2, cooldown_s=0.05, max_cooldown_s=0.2, all_down_timeout_s=0.3),
)


@pytest.fixture
def root(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    return d


@pytest.fixture
def servers():
    started: list[FakeVllmServer] = []

    def start(root, **kw) -> FakeVllmServer:
        s = FakeVllmServer(str(root), n_layers=N_LAYERS, hidden=HIDDEN, **kw).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def dataset(base, urls, root, **kw) -> VllmStreamingDataset:
    kw.setdefault("options", FAST)
    return VllmStreamingDataset(
        base,
        server_urls=urls,
        shared_storage_root=root,
        num_aux_layers=N_LAYERS - 1,
        hidden_size=HIDDEN,
        **kw,
    )


def check_item(item: dict, base_item: dict) -> None:
    ids = base_item["input_ids"].tolist()
    hs = expected_hidden(ids, N_LAYERS, HIDDEN)
    assert torch.equal(item["input_ids"], base_item["input_ids"])
    assert torch.equal(item["aux_hidden_states"], hs[:, :-1, :].reshape(len(ids), -1))
    assert torch.equal(item["target_last_hidden"], hs[:, -1, :])


def leftovers(root) -> list[str]:
    return sorted(os.listdir(root))


def test_values_collation_round_robin_and_cleanup(root, servers):
    a, b = servers(root), servers(root)
    base = conversations(12)
    ds = dataset(base, [a.url, b.url], root, model=MODEL_ID)
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_supervision))
    assert all(isinstance(x, Supervision) for x in batches)
    sup = batches[0]
    for i in range(4):
        n = len(base[i]["input_ids"])
        hs = expected_hidden(base[i]["input_ids"].tolist(), N_LAYERS, HIDDEN)
        assert torch.equal(sup.aux_hidden_states[i, :n], hs[:, :-1, :].reshape(n, -1))
        assert torch.equal(sup.target_last_hidden[i, :n], hs[:, -1, :])
        assert sup.attention_mask[i, :n].all() and not sup.attention_mask[i, n:].any()
        assert torch.equal(sup.loss_mask[i, :n], base[i]["loss_mask"]) and not sup.loss_mask[i, n:].any()
        assert not sup.aux_hidden_states[i, n:].any() and not sup.target_last_hidden[i, n:].any()
    assert sup.aux_hidden_states.shape[-1] == (N_LAYERS - 1) * HIDDEN
    assert len(a.served) == len(b.served) == 6  # round-robin from the first request
    assert leftovers(root) == []  # every file and lock deleted after reading
    stats = ds.server_stats()
    assert stats[a.url]["requests"] == 6 and stats[a.url]["errors"] == 0 and stats[a.url]["bytes"] > 0


def test_waits_for_the_writer_lock(root, servers):
    s = servers(root, write_delay_s=0.3)  # the file appears only 0.3 s after the response
    base = conversations(2)
    ds = dataset(base, [s.url], root)  # model discovered through GET /v1/models
    t0 = time.monotonic()
    check_item(ds[1], base[1])
    assert time.monotonic() - t0 >= 0.3
    assert ds.server_stats()[s.url]["errors"] == 0  # waited on the lock, no retry needed


@pytest.mark.parametrize("mode", ["escape", "dotdot", "symlink"])
def test_path_outside_root_is_rejected(root, servers, tmp_path, mode):
    secret = tmp_path / "outside.safetensors"
    secret.write_bytes(b"not yours")
    bad = servers(root, mode=mode, escape_target=str(secret))
    base = conversations(3)
    with pytest.raises(StreamingError) as e:
        dataset(base, [bad.url], root)[0]
    assert "outside the shared-storage root" in str(e.value) or "symlink" in str(e.value)
    assert "\n" not in str(e.value)
    assert secret.read_bytes() == b"not yours"  # never read into a sample, never deleted

    # With a healthy server beside it, every sample is delivered and the bad server leaves the rotation.
    good = servers(root)
    ds = dataset(base, [bad.url, good.url], root)
    for i in range(3):
        check_item(ds[i], base[i])
    stats = ds.server_stats()
    assert stats[bad.url]["errors"] >= 1 and stats[good.url]["requests"] == 3
    assert secret.exists()


def test_token_id_mismatch_is_rejected(root, servers):
    bad = servers(root, mode="wrong_tokens")
    base = conversations(2)
    with pytest.raises(StreamingError, match="token ids differ from the prompt"):
        dataset(base, [bad.url], root)[0]
    good = servers(root)
    ds = dataset(base, [bad.url, good.url], root)
    check_item(ds[0], base[0])
    check_item(ds[1], base[1])
    assert ds.server_stats()[bad.url]["errors"] >= 1
    assert leftovers(root) == []  # rejected files are deleted too


def test_500_is_retried_on_the_same_lone_server(root, servers):
    s = servers(root, fail_first=1)
    base = conversations(3)
    ds = dataset(base, [s.url], root)
    for i in range(3):
        check_item(ds[i], base[i])
    st = ds.server_stats()[s.url]
    assert st["errors"] == 1 and st["requests"] == 4


def test_server_leaves_and_rejoins_rotation(root, servers, caplog):
    # Two 500s open the breaker of the only server; after the cooldown a half-open probe succeeds: back in.
    s = servers(root, fail_first=2)
    base = conversations(3)
    ds = dataset(base, [s.url], root)
    for i in range(3):
        check_item(ds[i], base[i])
    st = ds.server_stats()[s.url]
    assert (st["errors"], st["down_events"], st["up_events"], st["open"]) == (2, 1, 1, 0)
    events = [r.getMessage() for r in caplog.records if "rotation" in r.getMessage()]
    assert len(events) == 2 and "taken out of rotation" in events[0] and "back in rotation" in events[1]


@pytest.mark.parametrize("mode", ["truncated", "no_file", "bad_json"])
def test_broken_answer_is_retried_elsewhere(root, servers, mode):
    # truncated: the lock is released on half a file; no_file: released with no file written (a writer
    # that failed); bad_json: a 200 without kv_transfer_params.
    bad, good = servers(root, mode=mode), servers(root)
    base = conversations(4)
    ds = dataset(base, [bad.url, good.url], root)
    for i in range(4):
        check_item(ds[i], base[i])
    assert ds.server_stats()[bad.url]["errors"] >= 1
    assert leftovers(root) == []


def test_hung_server_leaves_rotation_after_one_timeout(root, servers, caplog):
    import dataclasses

    hung, good = servers(root, mode="hang"), servers(root)
    base = conversations(6)
    opts = dataclasses.replace(
        FAST,
        request_timeout_s=0.3,
        breaker=dataclasses.replace(FAST.breaker, cooldown_s=30, max_cooldown_s=30),
    )
    ds = dataset(base, [hung.url, good.url], root, options=opts)
    t0 = time.monotonic()
    for i in range(6):
        check_item(ds[i], base[i])
    assert time.monotonic() - t0 < 2.0  # one timeout, not failure_threshold of them
    st = ds.server_stats()[hung.url]
    assert st["errors"] == 1 and st["down_events"] == 1 and hung.completions == 1
    down = [r.getMessage() for r in caplog.records if "taken out of rotation" in r.getMessage()]
    assert len(down) == 1 and hung.url in down[0] and "ReadTimeout" in down[0]  # the event is logged


def test_request_rejected_by_every_server_stops_with_one_line(root, servers):
    a, b = servers(root, mode="400"), servers(root, mode="400")
    with pytest.raises(StreamingError) as e:
        dataset(conversations(1), [a.url, b.url], root)[0]
    assert "rejected by every server" in str(e.value) and "HTTP 400" in str(e.value)


def test_server_dies_mid_epoch_every_sample_exactly_once(root):
    # Real processes: B exits (os._exit) right after its 4th answer, maybe before its file is written.
    pa, a = spawn(str(root), n_layers=N_LAYERS, hidden=HIDDEN)
    pb, b = spawn(str(root), n_layers=N_LAYERS, hidden=HIDDEN, die_after=4)
    try:
        base = conversations(30)
        ds = dataset(base, [a, b], root, num_workers=2)
        loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_supervision)
        seen = Counter()
        for sup in loader:
            assert sup.input_ids.shape[0] == 3  # never a short batch
            for row in range(3):
                i = int(sup.input_ids[row, 0]) - 100
                seen[i] += 1
                n = len(base[i]["input_ids"])
                hs = expected_hidden(base[i]["input_ids"].tolist(), N_LAYERS, HIDDEN)
                assert torch.equal(sup.target_last_hidden[row, :n], hs[:, -1, :])
                assert torch.equal(sup.aux_hidden_states[row, :n], hs[:, :-1, :].reshape(n, -1))
        assert seen == Counter(range(30))
        assert pb.wait(timeout=5) == 0  # B really died
        stats = ds.server_stats()  # summed over both workers through shared memory
        assert stats[b]["down_events"] >= 1 and stats[b]["errors"] >= 2
        delivered = sum(s["requests"] - s["errors"] for s in stats.values())
        assert delivered == 30 and stats[b]["requests"] - stats[b]["errors"] <= 4
        assert leftovers(root) == []
    finally:
        for p in (pa, pb):
            p.kill()
            p.wait(timeout=5)


def test_all_servers_dead_fails_with_one_clear_line(root, servers):
    a, b = servers(root), servers(root)
    a.kill()
    b.kill()
    t0 = time.monotonic()
    with pytest.raises(StreamingError) as e:
        dataset(conversations(2), [a.url, b.url], root)[0]
    msg = str(e.value)
    assert time.monotonic() - t0 < 10
    assert "no healthy hidden-state server" in msg and a.url in msg and b.url in msg and "\n" not in msg


def test_error_stays_one_line_through_dataloader_workers(root, servers):
    a = servers(root)
    a.kill()  # closed before the workers fork: their connections are refused
    ds = dataset(conversations(4), [a.url], root, num_workers=1)
    with pytest.raises(StreamingError) as e:
        list(DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_supervision))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("sample ") and "no healthy hidden-state server" in msg
    assert msg.endswith("(DataLoader worker process 0)")


def test_bearer_token(root, servers, tmp_path):
    s = servers(root, token="s3cret")
    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    tok.chmod(0o600)  # the one token-file reader refuses a token other users can read
    base = conversations(1)
    check_item(dataset(base, [s.url], root, auth_token_file=tok)[0], base[0])
    with pytest.raises(StreamingError, match="HTTP 401"):
        dataset(base, [s.url], root)[0]


def test_each_rank_fetches_only_its_shard(root, servers):
    s = servers(root)
    base = conversations(10)
    ds = dataset(base, [s.url], root, local_rank=1)
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)
    got = [
        int(sup.input_ids[0, 0]) - 100
        for sup in DataLoader(ds, sampler=sampler, collate_fn=collate_supervision)
    ]
    assert sorted(got) == sorted(sampler)
    assert sorted(p[0] - 100 for p in s.served) == sorted(sampler)  # nothing outside the shard was requested


def test_workers_start_round_robin_where_first_server_puts_them(root, servers):
    # Local rank 1 with 2 DataLoader workers over 4 servers: worker w starts at server (1 * 2 + w) % 4
    # (server_pool.first_server), then cycles.
    srv = [servers(root) for _ in range(4)]
    base = conversations(8)
    rr = dataclasses.replace(FAST, balance="round_robin")
    ds = dataset(base, [s.url for s in srv], root, local_rank=1, num_workers=2, options=rr)
    list(DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_supervision))
    where = {p[0] - 100: k for k, s in enumerate(srv) for p in s.served}
    # Worker i % 2 fetches index i as its (i // 2)-th request.
    assert where == {i: (2 + i % 2 + i // 2) % 4 for i in range(8)}


def test_least_outstanding_sends_less_to_a_slow_server_same_items(root, servers):
    # 3 workers share in-flight counts; one of two servers takes 0.5 s per sample, the other 0.01 s (plus this
    # machine's overhead). While the slow one is busy the others go to the fast one (an idle slow server still
    # gets a request on a tie: it adds capacity), so the fast one gets clearly more (round-robin: 12 and 12).
    # Every item is exact and in sampler order, and nothing stays counted in flight.
    slow, fast = servers(root, write_delay_s=0.5), servers(root, write_delay_s=0.01)
    base = conversations(24)
    ds = dataset(base, [slow.url, fast.url], root, num_workers=3)
    loader = DataLoader(ds, batch_size=2, num_workers=3, collate_fn=collate_supervision)
    got = [int(sup.input_ids[r, 0]) - 100 for sup in loader for r in range(2)]
    assert got == list(range(24))
    assert len(fast.served) >= len(slow.served) + 6 and len(slow.served) + len(fast.served) == 24
    assert all(s["outstanding"] == 0 for s in ds.server_stats().values())
    for i in (0, 7, 23):
        check_item(ds[i], base[i])


@pytest.mark.e2e  # spawned workers import torch afresh: seconds, so kept out of the fast tier
def test_spawned_workers_share_counters(root, servers):
    # The dataset (config + shared counters, never a live client) pickles into spawn-started workers.
    s = servers(root)
    base = conversations(4)
    ds = dataset(base, [s.url], root, num_workers=1)
    loader = DataLoader(
        ds, batch_size=2, num_workers=1, multiprocessing_context="spawn", collate_fn=collate_supervision
    )
    assert sorted(int(sup.input_ids[r, 0]) - 100 for sup in loader for r in range(2)) == [0, 1, 2, 3]
    assert ds.server_stats()[s.url]["requests"] == 4


def test_bad_configuration_is_named(root, tmp_path):
    from modelopt_ext.util.errors import ConfigError

    base = conversations(1)
    with pytest.raises(ConfigError) as e:  # the CLIs turn ConfigError into one line and exit code 2
        dataset(base, ["http://127.0.0.1:1"], tmp_path / "missing")
    assert e.value.lines() == [f"data.shared_storage_root {str(tmp_path / 'missing')!r} is not a directory"]
    with pytest.raises(ValueError, match="data.server_urls is empty"):
        dataset(base, [], root)
    with pytest.raises(ValueError, match="not an http"):
        dataset(base, ["localhost:8000"], root)
    with pytest.raises(ValueError, match="data.shared_storage_root"):
        dataset(base, ["http://127.0.0.1:1"], tmp_path / "missing")
    with pytest.raises(ValueError, match="data.auth_token_file"):
        dataset(base, ["http://127.0.0.1:1"], root, auth_token_file=tmp_path / "nope")


def test_resume_is_the_sampler_position(root, servers):
    # The trainer's resumable sampler holds the data position; streaming adds no state of its own: a resumed
    # reader fetches exactly the samples after the position, and none before it.
    from modelopt_ext.training.sampler import ResumableShardedSampler

    s = servers(root)
    base = conversations(12)
    ds = dataset(base, [s.url], root)
    full = ResumableShardedSampler(len(ds), batch_size=2, seed=5)
    order = [i for batch in full for i in batch]
    resumed = ResumableShardedSampler(len(ds), batch_size=2, seed=5)
    resumed.set_epoch(0, position=6)
    got = [
        int(sup.input_ids[r, 0]) - 100
        for sup in DataLoader(ds, batch_sampler=resumed, collate_fn=collate_supervision)
        for r in range(2)
    ]
    assert got == order[6:]
    assert [p[0] - 100 for p in s.served] == order[6:]
