"""Progress reporting: a periodic log line, `metrics.jsonl`, and a final human summary (rank 0 only).

Throughput counts what all ranks processed (samples, and non-padding tokens) since this process started
training, so a resumed run reports its own speed, not the speed of the run it resumed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    """12.3 -> '12s', 754 -> '12m34s', 7384 -> '2h03m'."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass
class ProgressTracker:
    """Counts work since training (re)started and renders log lines, the metrics file and the summary."""

    total_steps: int
    start_step: int = 0
    output_dir: Path | None = None
    enabled: bool = True  # False on ranks other than 0
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    clock: Any = time.monotonic
    samples: float = 0.0
    tokens: float = 0.0
    last_metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.t0 = self.clock()
        self.step = self.start_step

    @property
    def elapsed(self) -> float:
        """Seconds since training (re)started in this process."""
        return self.clock() - self.t0

    def add(self, samples: float, tokens: float) -> None:
        """Count work done by all ranks."""
        self.samples += samples
        self.tokens += tokens

    def rates(self) -> tuple[float, float]:
        """(samples/s, tokens/s) since the start of this process's training."""
        dt = max(self.elapsed, 1e-9)
        return self.samples / dt, self.tokens / dt

    def eta(self, step: int) -> float:
        """Seconds left at the mean step time so far."""
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (self.total_steps - step) * self.elapsed / done

    def log(
        self,
        step: int,
        epoch: int,
        metrics: dict[str, float],
        lr: float,
        telemetry: tuple[str, list[str], dict[str, Any]] | None = None,
    ) -> str:
        """Emit one progress line and append a metrics record; returns the line.

        `telemetry` (modelopt_ext.telemetry): (segment for the line, extra lines printed after it, fields
        added to the metrics record).
        """
        self.step = step
        self.last_metrics = dict(metrics)
        sps, tps = self.rates()
        acc = " ".join(
            f"{metrics[k]:.2f}" for k in sorted((k for k in metrics if k.startswith("acc_")), key=_step_key)
        )
        line = (
            f"step {step}/{self.total_steps} epoch {epoch} | loss {metrics.get('loss', float('nan')):.4f}"
            f" | acc [{acc}] | sim_accept_len {metrics.get('sim_accept_len', float('nan')):.3f}"
            f" | lr {lr:.3g} | {sps:.2f} samples/s {tps:.0f} tok/s"
            + (f" | {telemetry[0]}" if telemetry and telemetry[0] else "")
            + f" | ETA {format_duration(self.eta(step))}"
        )
        if self.enabled:
            print("\n".join([line, *(telemetry[1] if telemetry else [])]), file=self.stream, flush=True)
            self._append(
                {
                    "step": step,
                    "epoch": epoch,
                    "lr": lr,
                    "samples_per_s": sps,
                    "tokens_per_s": tps,
                    "elapsed_s": self.elapsed,
                    # CPU seconds of this process: on a shared machine, rates by CPU time are not skewed by
                    # other jobs taking the cores (bench/vs_modelopt.py reports both).
                    "process_cpu_s": time.process_time(),
                    "run_samples": self.samples,
                    "run_tokens": self.tokens,
                    **metrics,
                    **(telemetry[2] if telemetry else {}),
                }
            )
        return line

    def _append(self, record: dict[str, Any]) -> None:
        if self.output_dir is None:
            return
        path = Path(self.output_dir) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def summary(
        self,
        step: int,
        checkpoint: Path | None,
        export: Path | None,
        note: str = "",
        extra_lines: list[str] | None = None,
    ) -> str:
        """The closing human summary (printed on rank 0), `extra_lines` (telemetry) appended; returns its text."""
        sps, tps = self.rates()
        m = self.last_metrics
        acc = ", ".join(
            f"{k}={m[k]:.3f}" for k in sorted((k for k in m if k.startswith("acc_")), key=_step_key)
        )
        lines = [
            f"training {'stopped' if note else 'done'}: {step - self.start_step} steps this run "
            f"(global step {step}/{self.total_steps}) in {format_duration(self.elapsed)}"
            + (f" ({note})" if note else ""),
            f"  throughput: {sps:.2f} samples/s, {tps:.0f} tokens/s (all ranks)",
            f"  final: loss {m.get('loss', float('nan')):.4f}, sim_accept_len {m.get('sim_accept_len', float('nan')):.3f}"
            + (f", {acc}" if acc else ""),
            f"  checkpoint: {checkpoint if checkpoint else '(none)'}",
            f"  export: {export if export else '(none)'}",
            *(extra_lines or []),
        ]
        text = "\n".join(lines)
        if self.enabled:
            print(text, file=self.stream, flush=True)
        return text


def _step_key(name: str) -> tuple[int, str]:
    tail = name.rsplit("_", 1)[-1]
    return (int(tail), name) if tail.isdigit() else (1 << 30, name)
