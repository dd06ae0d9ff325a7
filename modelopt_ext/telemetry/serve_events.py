"""Serve-node events of a job (server restarts, servers given up) added to the run's report.

The serve nodes' entry scripts record them in the job's rendezvous folder (docs/entry-scripts.md):
`server.<id>.restarts` (how often node <id> restarted its server) and `server.<id>.down` (it gave its server
up, and why). The trainer's own telemetry sees the other side (outages per server URL, in metrics.json's
`servers`); after training the head trainer node runs

    python -m modelopt_ext.telemetry.serve_events --rendezvous DIR --serve-ids 0,1 --output TRAIN_OUTPUT_DIR

which adds `serve_nodes` ({node id: {"restarts": n, "down": reason or null}}) to OUTPUT/metrics.json and one
line to OUTPUT/summary.txt (both rewritten atomically), and prints that line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from modelopt_ext.util.fileio import write_json_atomic, write_text_atomic


def read_serve_events(rendezvous: Path, serve_ids: list[int]) -> dict[str, dict]:
    """{node id: {"restarts": int, "down": str | None}} from the rendezvous folder's files."""
    events = {}
    for node in serve_ids:
        restarts_file = rendezvous / f"server.{node}.restarts"
        down_file = rendezvous / f"server.{node}.down"
        restarts = 0
        if restarts_file.is_file():
            text = restarts_file.read_text().strip()
            if not text.isdigit():
                raise ValueError(f"{restarts_file}: expected a restart count, got {text[:40]!r}")
            restarts = int(text)
        down = down_file.read_text().strip().splitlines()[0] if down_file.is_file() else None
        events[str(node)] = {"restarts": restarts, "down": down or None}
    return events


def events_line(events: dict[str, dict]) -> str:
    """One line naming the serve nodes that restarted or gave up their server."""
    parts = []
    for node, e in events.items():
        if e["restarts"]:
            parts.append(f"node {node}: {e['restarts']} restart(s)")
        if e["down"]:
            parts.append(f"node {node}: down ({e['down']})")
    return "hidden-state server restarts during the job: " + ("; ".join(parts) if parts else "none")


def record_serve_events(output: Path, rendezvous: Path, serve_ids: list[int]) -> str:
    """Add the events to OUTPUT/metrics.json and OUTPUT/summary.txt (those that exist); the summary line."""
    events = read_serve_events(rendezvous, serve_ids)
    line = events_line(events)
    metrics = output / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        m["serve_nodes"] = events
        write_json_atomic(metrics, m, sort_keys=True)
    summary = output / "summary.txt"
    if summary.is_file():
        kept = [s for s in summary.read_text().splitlines() if not s.strip().startswith(line.split(":")[0])]
        write_text_atomic(summary, "\n".join([*kept, f"  {line}"]) + "\n")
    return line


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated node ids, got {text!r}") from None
    return ids


def main(argv: list[str] | None = None) -> int:
    """Record and print; an unreadable file is one line and exit 2."""
    p = argparse.ArgumentParser(prog="python -m modelopt_ext.telemetry.serve_events", description=__doc__.split("\n")[0])
    p.add_argument("--rendezvous", required=True, type=Path, help="the job's rendezvous folder")
    p.add_argument("--serve-ids", required=True, type=_ids, help="the plan's serve node ids (SERVE_NODE_IDS)")
    p.add_argument("--output", required=True, type=Path, help="the training output folder (training.output_dir)")
    args = p.parse_args(argv)
    try:
        line = record_serve_events(args.output, args.rendezvous, args.serve_ids)
    except (OSError, ValueError) as e:
        print(f"serve_events: {e}", file=sys.stderr)
        return 2
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
