"""Progress lines, metrics.jsonl and the final summary."""

import io
import json

from modelopt_ext.training.progress import ProgressTracker, format_duration


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_format_duration():
    assert [format_duration(x) for x in (5, 754, 7384, float("nan"))] == ["5s", "12m34s", "2h03m", "?"]


def test_log_line_rates_eta_and_metrics_file(tmp_path):
    clock, out = FakeClock(), io.StringIO()
    p = ProgressTracker(total_steps=100, start_step=20, output_dir=tmp_path, stream=out, clock=clock)
    clock.t += 10.0
    p.add(samples=40, tokens=4000)
    line = p.log(
        30, 1, {"loss": 1.25, "acc_1": 0.5, "acc_0": 0.75, "acc_10": 0.1, "sim_accept_len": 2.5}, lr=1e-4
    )
    # 10 steps in 10 s -> 70 steps left -> 70 s; rates over this run only.
    assert "step 30/100" in line and "4.00 samples/s 400 tok/s" in line and "ETA 1m10s" in line
    assert "acc [0.75 0.50 0.10]" in line and "sim_accept_len 2.500" in line
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 30 and rec["loss"] == 1.25 and rec["samples_per_s"] == 4.0
    text = p.summary(30, tmp_path / "epoch_1_step_30", None)
    assert "10 steps this run (global step 30/100)" in text and "epoch_1_step_30" in text
    assert out.getvalue().count("\n") >= 6


def test_disabled_tracker_prints_and_writes_nothing(tmp_path):
    out = io.StringIO()
    p = ProgressTracker(total_steps=5, output_dir=tmp_path, enabled=False, stream=out)
    p.log(1, 0, {"loss": 1.0}, lr=0.1)
    p.summary(1, None, None)
    assert out.getvalue() == "" and not (tmp_path / "metrics.jsonl").exists()
