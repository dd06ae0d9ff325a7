"""The scaling benchmark: its figures from telemetry records (pure logic), and a smoke run of `--quick`.

The smoke run checks that the table is whole (every point measured, every column filled, the kill table, the
heat map, the last line's form), never the figures themselves: they depend on how loaded the machine is.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from modelopt_ext.bench import scaling
from modelopt_ext.bench.scaling import Point, Settings, kill_figures, steady_figures, summary_line

URLS = ["http://a", "http://b"]


def _records(rate: float, steps: int = 40, dt: float = 0.5, per_step: int = 4, stall=None) -> list[dict]:
    """metrics.jsonl-like records every 2 steps; `stall` = (t0, t1): no samples trained in between."""
    recs, t, samples = [], 0.0, 0.0
    for step in range(2, steps + 1, 2):
        t += dt
        if stall and stall[0] < t <= stall[1]:
            t = stall[1]  # this record closes the stall: nothing new in it
        else:
            samples += 2 * per_step
        recs.append(
            {
                "step": step,
                "elapsed_s": t,
                "run_samples": samples,
                "data_wait_frac": 0.1,
                "hs_mb_per_s": 2.0,
                "servers": {u: {"requests": 4 if u == "http://a" else 2} for u in URLS},
            }
        )
    return recs


def test_steady_figures_skip_the_warm_up_and_add_up_windows():
    st = Settings(demand=10.0, steps=40)
    row = steady_figures(Point("homogeneous", 2, 2), st, _records(rate=16.0), URLS, [10.0, 10.0])
    assert row["measured"] == pytest.approx(16.0)  # 8 samples per 0.5 s
    assert row["ideal"] == 20.0 and row["efficiency"] == pytest.approx(0.8)
    assert row["data_wait"] == pytest.approx(0.1) and row["mb_per_s"] == pytest.approx(2.0)
    assert row["share_max_min"] == pytest.approx(2.0)
    assert row["steady_s"] == pytest.approx(0.5 * (20 - 5))  # records after step 10 (25% of 40)


def test_kill_figures_find_the_drop_and_the_recovery():
    st = Settings(demand=10.0, steps=200)
    recs = _records(rate=16.0, steps=200, stall=(20.0, 22.0))  # nothing trained for 2 s after the kill
    k = kill_figures(recs, 20.0, [10.0, 10.0], Point("kill", 2, 2, kill=True), st)
    assert k["rate_before"] == pytest.approx(16.0)
    assert k["ideal_after"] == 10.0 and k["worst_bin_after"] == pytest.approx(0.0, abs=1e-9)
    assert k["drop"] == pytest.approx(1.0) and k["recovery_s"] == pytest.approx(2.0)
    assert kill_figures(recs, None, [10.0], Point("kill", 1, 1, kill=True), st)["kill_error"]


def test_summary_line_counts_streaming_default_points_only():
    rows = [
        {**Point("homogeneous", 1, 1).__dict__, "efficiency": 0.9},
        {**Point("homogeneous", 2, 1).__dict__, "efficiency": 1.0},
        {**Point("heterogeneous", 2, 2, "round_robin", slow_server=True).__dict__, "efficiency": 0.5},
        {**Point("remote", 1, 1, protocol="serve_target").__dict__, "efficiency": 0.4},
        {**Point("kill", 2, 1, kill=True).__dict__, "efficiency": 0.3},
    ]
    assert summary_line(rows) == "scaling efficiency: min 90.0% mean 95.0% over 2 points"


def test_share_verdict_says_how_many_requests_it_rests_on():
    """A share of 14/12 from a short point is one request: the verdict names the count and what one is worth."""
    rows = [
        {**Point("homogeneous", 8, 1).__dict__, "supply": 40.0, "demand": 5.0, "efficiency": 0.99,
         "data_wait": 0.01, "share_max_min": 14 / 12, "requests": [13.0, 14.0, 12.0, 14.0]},
        {**Point("homogeneous", 4, 1).__dict__, "supply": 20.0, "demand": 5.0, "efficiency": 0.99,
         "data_wait": 0.01, "share_max_min": 1.01, "requests": [139.0, 140.0, 140.0, 140.0]},
    ]  # fmt: skip
    line = next(x for x in scaling.goals_lines(rows) if x.startswith("homogeneous servers"))
    assert line == (
        "homogeneous servers: request share max/min worst 1.17 (8 servers x 1 ranks, 12 requests on the "
        "least-used server in the window: one request is 8.3% of it)"
    )


def test_point_seconds_sets_how_long_a_point_trains():
    assert scaling.parse_args(["--point-seconds", "150"]).point_seconds == 150.0
    st = Settings(target_s=150.0, steps=1000)
    assert scaling.point_steps(Point("homogeneous", 8, 1), st) == 375  # 150 s x 5 samples/s / batch 2
    with pytest.raises(SystemExit):
        scaling.parse_args(["--point-seconds", "0"])


@pytest.mark.e2e  # minutes: real trainer ranks and servers
def test_quick_run_prints_a_whole_table(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    rc = scaling.main(["--quick", "--out", str(out), "--steps", "24"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = json.loads(out.read_text())["rows"]
    points = scaling.quick_points()
    assert [(r["scenario"], r["servers"], r["ranks"], r["balance"]) for r in rows] == [
        (p.scenario, p.servers, p.ranks, p.balance) for p in points
    ]
    for r in rows:
        for key in ("measured", "ideal", "efficiency", "data_wait", "mb_per_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
        assert r["share_max_min"] >= 1.0
    kill = [r for r in rows if r["kill"]]
    assert kill and all("rate_before" in r and "recovery_s" in r for r in kill)
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("scenario"))
    assert len([line for line in lines[head + 1 : head + 1 + len(points)] if "FAILED" not in line]) == len(
        points
    )
    assert any(line.startswith("one server killed mid-run") for line in lines)
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.fullmatch(r"scaling efficiency: min [\d.]+% mean [\d.]+% over \d+ points", lines[-1])


def test_tables_have_a_line_per_point_and_the_kill_table(tmp_path, capsys):
    st = Settings(demand=10.0, steps=40)
    recs = _records(rate=16.0)
    rows = [
        steady_figures(Point("homogeneous", 2, 2), st, recs, URLS, [10.0, 10.0]),
        {**steady_figures(Point("kill", 2, 2, kill=True), st, recs, URLS, [10.0, 10.0]),
         **kill_figures(recs, 8.0, [10.0, 10.0], Point("kill", 2, 2, kill=True), st)},
        {**Point("remote", 1, 1, protocol="serve_target").__dict__, "error": "boom"},
    ]  # fmt: skip
    text = scaling.format_table(rows).splitlines()
    assert text[0].split()[:5] == ["scenario", "proto", "choice", "N", "M"]
    assert [line.split()[0] for line in text[1:4]] == ["homogeneous", "kill", "remote"] and "FAILED" in text[
        3
    ]
    # Streaming rows name the server choice; remote rows the call-ahead depth they ran with.
    assert text[1].split()[2] == "least_outstanding" and text[3].split()[2] == "call_ahead=1"
    assert any(line.startswith("one server killed") for line in text)
    md = scaling.format_markdown(rows).splitlines()
    assert md[0].startswith("| scenario") and len([x for x in md if x.startswith("| kill")]) == 1
    assert any(x.startswith("| least_outstanding | 2 | 2 |") for x in md)  # the kill table
    out = tmp_path / "rows.json"
    out.write_text(json.dumps({"rows": rows}))
    assert scaling.main(["--from-json", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == summary_line(rows)
