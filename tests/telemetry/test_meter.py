"""Meter math on controlled timings: data-wait fraction, supply share, rates, per-server figures, windows."""

from __future__ import annotations

import math

import pytest
import torch

from modelopt_ext.targets.supervision import Supervision
from modelopt_ext.telemetry.latency import N_BINS, LatencyHistogram, bin_index, percentile
from modelopt_ext.telemetry.meter import IN_PROCESS, PREFETCHED, REMOTE, TrainMeter, classify_source


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _batch(b=2, t=5, pad=1):
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[:, t - pad :] = False
    return {"input_ids": torch.ones(b, t, dtype=torch.long), "attention_mask": mask, "loss_mask": mask}


def _sup(batch, h=4):
    b, t = batch["input_ids"].shape
    return Supervision(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        loss_mask=batch["loss_mask"],
        aux_hidden_states=torch.zeros(b, t, 3 * h),
        target_last_hidden=torch.zeros(b, t, h),
    )


class SlowLoader:
    """Each batch takes `wait` seconds of the fake clock to arrive."""

    def __init__(self, clock, n, wait):
        self.clock, self.n, self.wait = clock, n, wait

    def __iter__(self):
        for _ in range(self.n):
            self.clock.t += self.wait
            yield _batch()


def test_wait_fraction_and_rates_on_controlled_timings():
    clock = Clock()
    m = TrainMeter(kind=PREFETCHED, clock=clock)
    m.start()

    def source(batch):
        clock.t += 0.5  # relabelling counted as wait too
        return _sup(batch)

    for batch in m.timed(SlowLoader(clock, 4, wait=3.0)):
        m.fetch(source, batch)
        clock.t += 6.5  # compute
    win, total = m.window()
    # per batch: 3 s loader + 0.5 s source of 10 s; the first batch's 3 s are start-up (not in the fraction)
    assert total.wall_s == pytest.approx(40.0) and total.startup_s == pytest.approx(3.0)
    assert total.data_wait_frac == pytest.approx(11.0 / 37.0)
    assert total.samples == 8 and total.tokens == 8 * 4  # one padding token per row
    assert total.rate(total.tokens) == pytest.approx(32 / 40)
    assert total.supply_tokens_per_s() == pytest.approx(32 / 37)
    assert total.demand_tokens_per_s() == pytest.approx(32 / 26)
    per_batch = 2 * 5 * 4 * 4 + 2 * 5 * 4 * 4 * 3 + 2 * 5 * 8 + 2 * 5 * 2  # aux, last, ids, masks
    assert total.sup_bytes == per_batch * 4 and total.record()["hs_bytes_per_sample"] == per_batch / 2
    assert win.wall_s == total.wall_s  # first window = everything so far
    # Second window: instant data.
    for batch in m.timed(SlowLoader(clock, 2, wait=2.0)):  # a new pass over the data: start-up again
        m.fetch(lambda b: _sup(b), batch)
        clock.t += 8.0
    win2, total2 = m.window()
    assert win2.wall_s == pytest.approx(20.0) and win2.startup_s == pytest.approx(2.0)
    assert win2.data_wait_frac == pytest.approx(2.0 / 18.0)
    assert total2.data_wait_frac == pytest.approx(13.0 / 55.0)
    m.stop()
    clock.t += 100.0  # export, teardown: not training time
    assert m.aggregate().wall_s == pytest.approx(60.0)


def test_all_reduce_time_is_peer_wait_and_not_demand():
    # A fed rank of a starved job: data arrives at once, but it waits 3 s per step in the all-reduce for a
    # starved peer. That time is not the drafter's work: the demand leaves it out like the data wait.
    clock = Clock()
    m = TrainMeter(kind=PREFETCHED, clock=clock)
    m.start()

    def all_reduce(grads, env):
        clock.t += 3.0
        return "reduced"

    for batch in m.timed(SlowLoader(clock, 4, wait=0.0)):
        m.fetch(lambda b: _sup(b), batch)
        clock.t += 1.0  # compute
        assert m.synced(all_reduce, [], None) == "reduced"
    total = m.aggregate()
    assert total.sync_s == pytest.approx(12.0) and total.sync_frac == pytest.approx(0.75)
    assert total.data_wait_frac == pytest.approx(0.0)
    assert total.demand_tokens_per_s() == pytest.approx(32 / 4.0)  # 4 s of compute, not 16 s
    assert total.record()["sync_frac"] == pytest.approx(0.75)
    with pytest.raises(ZeroDivisionError):  # a failing collective still counts its time
        m.synced(lambda: (setattr(clock, "t", clock.t + 2.0), 1 / 0))
    assert m.aggregate().sync_s == pytest.approx(14.0)


def test_in_process_source_counts_as_supply_not_wait():
    clock = Clock()
    m = TrainMeter(kind=IN_PROCESS, clock=clock)
    m.start()

    def target_forward(batch):
        clock.t += 6.0
        return _sup(batch)

    for batch in m.timed(SlowLoader(clock, 2, wait=1.0)):
        m.fetch(target_forward, batch)
        clock.t += 3.0
    _, total = m.window()
    # 20 s: 1 s start-up, 1 s wait, 12 s target forward, 6 s training
    assert total.supply_frac == pytest.approx(12 / 19) and total.data_wait_frac == pytest.approx(1 / 19)
    assert "servers" not in total.record()


def test_remote_source_is_timed_per_server():
    clock = Clock()

    class Remote:
        telemetry_kind = REMOTE
        url = "http://b:1/"

        def __call__(self, batch):
            clock.t += 0.2
            return _sup(batch)

    src = Remote()
    assert classify_source(src) == REMOTE
    assert classify_source(lambda batch: batch) == IN_PROCESS  # declares nothing: runs here
    Remote.telemetry_kind = "network"
    with pytest.raises(ValueError, match=r"Remote.telemetry_kind = 'network'; expected one of"):
        classify_source(src)
    Remote.telemetry_kind = REMOTE
    m = TrainMeter(kind=REMOTE, urls=["http://a:1", "http://b:1"], clock=clock)
    src.url = "http://b:1"
    m.start()
    for batch in m.timed([_batch(), _batch()]):
        m.fetch(src, batch)
        clock.t += 0.8
    _, total = m.window()  # start-up 0: the list is instant
    s = total.server_summary()
    assert s["http://a:1"]["requests"] == 0 and s["http://b:1"]["requests"] == 2
    assert s["http://b:1"]["lat_mean_ms"] == pytest.approx(200.0)
    assert s["http://b:1"]["lat_p50_ms"] == pytest.approx(200.0, rel=0.34)
    assert total.data_wait_frac == pytest.approx(0.2)


def test_shared_server_counters_are_read_and_preferred_for_bytes():
    clock = Clock()
    hist = LatencyHistogram(["http://s:1"], shared=True)
    counters = {"http://s:1": {"requests": 10, "errors": 2, "latency_s": 5.0, "bytes": 4e6, "down_events": 1}}
    for x in [0.1] * 9 + [2.0]:
        hist.observe("http://s:1", x)
    m = TrainMeter(
        kind=PREFETCHED, urls=["http://s:1"], server_stats=lambda: counters, server_latency=hist, clock=clock
    )
    m.start()
    clock.t += 2.0
    _, total = m.window()
    s = total.server_summary()["http://s:1"]
    assert (s["requests"], s["errors"], s["down_events"]) == (10, 2, 1)
    assert s["lat_mean_ms"] == pytest.approx(500.0)
    assert s["lat_p50_ms"] == pytest.approx(100.0, rel=0.34) and s["lat_p95_ms"] == pytest.approx(
        2000.0, rel=0.34
    )
    assert total.record()["hs_mb_per_s"] == pytest.approx(2.0)  # server bytes, not the (empty) batches'


def test_histogram_percentiles_and_edges():
    assert bin_index(0.0) == 0 and bin_index(float("nan")) == 0 and bin_index(1e9) == N_BINS - 1
    assert math.isnan(percentile([0] * N_BINS, 0.5))
    counts = [0.0] * N_BINS
    for x in (0.010, 0.020, 0.050, 0.100, 0.200, 0.500, 1.0, 2.0, 5.0, 10.0):
        counts[bin_index(x)] += 1
    assert percentile(counts, 0.5) == pytest.approx(0.2, rel=0.34)
    assert percentile(counts, 1.0) == pytest.approx(10.0, rel=0.34)
    h = LatencyHistogram(["u"])
    h.observe("unknown", 1.0)  # ignored, never raises
    assert sum(h.counts()["u"]) == 0


def test_progress_line_and_record_carry_telemetry(tmp_path):
    import io
    import json

    from modelopt_ext.telemetry.meter import format_window
    from modelopt_ext.training.progress import ProgressTracker

    clock = Clock()
    m = TrainMeter(kind=IN_PROCESS, clock=clock)
    m.start()
    for batch in m.timed(SlowLoader(clock, 2, wait=1.0)):
        m.fetch(lambda b: (clock.__setattr__("t", clock.t + 2.0), _sup(b))[1], batch)
        clock.t += 1.0
    win, _ = m.window()  # 8 s: 1 s start-up, then 1 s wait, 4 s target forward, 2 s training
    seg, extra = format_window(win, m.kind)
    assert seg.startswith("wait 14% | target fwd 57% | ") and extra == []
    out = io.StringIO()
    p = ProgressTracker(total_steps=4, output_dir=tmp_path, stream=out, clock=clock)
    line = p.log(1, 0, {"loss": 1.0}, lr=0.1, telemetry=(seg, ["  servers: x"], win.record()))
    assert "| wait 14% | target fwd 57% |" in line and line.index("wait") < line.index("ETA")
    assert out.getvalue().splitlines()[1] == "  servers: x"
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["data_wait_frac"] == pytest.approx(1 / 7) and rec["supply_frac"] == pytest.approx(4 / 7)
    assert rec["startup_s"] == pytest.approx(1.0)
    text = p.summary(1, None, None, extra_lines=["  telemetry line"])
    assert text.endswith("  telemetry line")
