"""Serve-node restarts recorded by the entry scripts end up in the run's metrics.json and summary."""

from __future__ import annotations

import json
import subprocess
import sys

from modelopt_ext.telemetry.serve_events import record_serve_events
from modelopt_ext.telemetry.summary import write_metrics_json


def _run(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "modelopt_ext.telemetry.serve_events", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_restarts_and_a_server_given_up_reach_metrics_and_summary(tmp_path):
    rdv, out = tmp_path / "rdv", tmp_path / "out"
    rdv.mkdir()
    out.mkdir()
    (rdv / "server.0.restarts").write_text("2\n")
    (rdv / "server.3.restarts").write_text("3\n")
    (rdv / "server.3.down").write_text("exited with code 137 after 3 restart(s) of 3\n")
    write_metrics_json(out / "metrics.json", {"world_size": 2, "servers": {}})
    (out / "summary.txt").write_text("training summary\n  verdict: supply kept up\n")

    p = _run(tmp_path, "--rendezvous", str(rdv), "--serve-ids", "0,1,3", "--output", str(out))
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip()
    assert line == (
        "hidden-state server restarts during the job: node 0: 2 restart(s); node 3: 3 restart(s); "
        "node 3: down (exited with code 137 after 3 restart(s) of 3)"
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert m["serve_nodes"] == {
        "0": {"restarts": 2, "down": None},
        "1": {"restarts": 0, "down": None},
        "3": {"restarts": 3, "down": "exited with code 137 after 3 restart(s) of 3"},
    }
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[:2] == ["training summary", "  verdict: supply kept up"] and summary[-1] == f"  {line}"
    # Recording twice (a re-run of the step) replaces the line instead of repeating it.
    record_serve_events(out, rdv, [0, 1, 3])
    assert (out / "summary.txt").read_text().count("restarts during the job") == 1


def test_no_events_and_bad_files(tmp_path):
    rdv, out = tmp_path / "rdv", tmp_path / "out"
    rdv.mkdir()
    out.mkdir()
    assert record_serve_events(out, rdv, [0, 1]).endswith(": none")
    assert not (out / "metrics.json").exists()  # nothing invented when the trainer wrote no report
    (rdv / "server.1.restarts").write_text("lots")
    p = _run(tmp_path, "--rendezvous", str(rdv), "--serve-ids", "0,1", "--output", str(out))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert "server.1.restarts: expected a restart count" in p.stderr
    p = _run(tmp_path, "--rendezvous", str(rdv), "--serve-ids", "0,x", "--output", str(out))
    assert p.returncode == 2 and "comma-separated node ids" in p.stderr
