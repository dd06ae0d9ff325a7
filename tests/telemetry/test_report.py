"""The run report: verdict wording, metrics.json (strict JSON), the plot on odd inputs."""

from __future__ import annotations

import json

import pytest

from modelopt_ext.telemetry.meter import IN_PROCESS, PREFETCHED, Totals
from modelopt_ext.telemetry.plot import PANELS, plot_training
from modelopt_ext.telemetry.plot import main as plot_main
from modelopt_ext.telemetry.summary import build_metrics, summary_lines, verdict, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(wait_s, kind=PREFETCHED, supply_s=0.0, servers=True):
    srv = {}
    if servers:
        hist = [0.0] * 49
        hist[16] = 10  # ~100 ms
        srv = {
            "http://n1:8765": {
                "requests": 10,
                "errors": 1,
                "latency_s": 1.0,
                "bytes": 5e6,
                "down_events": 0,
                "hist": hist,
            }
        }
    t = Totals(ranks=2, wall_s=200.0, wait_s=wait_s, supply_s=supply_s, samples=40, tokens=4000, servers=srv)
    return build_metrics(
        t,
        kind=kind,
        global_step=10,
        start_step=0,
        total_steps=10,
        samples=40,
        tokens=4000,
        wall_s=100.0,
        final_metrics={"loss": 1.5, "acc_0": 0.5, "sim_accept_len": 1.7},
        num_workers=2,
    )


def test_starved_verdict_gives_supply_vs_demand_and_suggests_serve_nodes():
    m = _metrics(wait_s=150.0)  # 75% of the (2-rank) time waiting
    assert m["starved"] and m["data_wait_frac"] == pytest.approx(0.75)
    assert m["supply_tokens_per_s"] == pytest.approx(40.0)  # 4000 tokens / 100 s per rank
    assert m["demand_tokens_per_s"] == pytest.approx(160.0)  # 4000 / 25 s not waiting
    text = "\n".join(verdict(m))
    assert "STARVED" in text and "supply 40 tok/s" in text and "demand 160 tok/s" in text and "(4.0x)" in text
    assert "more serve nodes (SERVE_NODES, now 1; about 5 to keep up)" in text
    assert "STREAMING_NUM_WORKERS" in text and "now 2" in text


def test_fast_run_is_not_starved():
    m = _metrics(wait_s=20.0)
    assert not m["starved"]
    text = "\n".join(summary_lines(m))
    assert "STARVED" not in text and "supply kept up (data wait 10%" in text
    assert "server n1:8765: 10 req, 1 err" in text and "latency mean 100ms p50 87ms" in text


def test_colocated_run_reports_target_share():
    m = _metrics(wait_s=2.0, kind=IN_PROCESS, supply_s=130.0, servers=False)
    text = "\n".join(summary_lines(m))
    assert "target forward 65%" in text and "data.mode: streaming" in text and "STARVED" not in text
    starved = _metrics(wait_s=100.0, kind=IN_PROCESS, servers=False)
    text = "\n".join(verdict(starved))
    assert "data loading is the bottleneck" in text and "data.num_workers, now 2" in text


def test_report_files_are_strict_json_and_png(tmp_path):
    m = _metrics(wait_s=20.0, servers=False)
    m["final"]["loss_1"] = float("nan")
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "loss": 2.0, "acc_0": 0.3, "samples_per_s": 4.0, "tokens_per_s": 400.0}) + "\n"
    )
    written = write_report(tmp_path, m, "summary text")
    data = json.loads(written["metrics"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["steps"] == 10 and data["final"]["acc_0"] == 0.5 and data["final"]["loss_1"] is None
    assert written["summary"].read_text() == "summary text\n"
    assert written["plot"].read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "lines",
    [
        [],  # no records at all
        ["not json", "[1, 2]"],  # garbage only
        [{"step": 1, "loss": 3.0}],  # one step, few fields
        [{"step": 1}, {"step": 2, "loss": None, "acc_0": float("nan")}],  # missing / NaN fields
        [
            {
                "step": s,
                "loss": 5 - s / 10,
                "loss_0": 4 - s / 10,
                "loss_1": 5 - s / 20,
                "acc_0": s / 30,
                "acc_1": s / 40,
                "sim_accept_len": 1 + s / 30,
                "samples_per_s": 8.0,
                "tokens_per_s": 800.0,
                "data_wait_frac": 0.4,
                "hs_mb_per_s": 3.0,
            }
            for s in range(1, 21)
        ],
    ],
)
def test_plot_never_crashes_and_writes_a_png(tmp_path, lines):
    src = tmp_path / "metrics.jsonl"
    src.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    out = tmp_path / "training.png"
    assert plot_training(src, out) == list(PANELS)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_cli(tmp_path, capsys):
    assert plot_main([str(tmp_path)]) == 2  # no metrics.jsonl: one line, exit 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert plot_main([str(tmp_path)]) == 0 and (tmp_path / "training.png").is_file()
