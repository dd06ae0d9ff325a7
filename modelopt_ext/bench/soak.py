"""Soak: hidden-state servers under several concurrent clients for a bounded time.

    python -m modelopt_ext.bench.soak [--quick] [--seconds 120] [--clients 4] [--engines target,vllm] [--out JSON]

Per engine, on the tiny target (`recipes/eagle3/tiny.yaml`, built when missing):
- `target`: `python -m modelopt_ext.serve_target`; each client thread sends batches with its own
  `RemoteTargetClient` (wire format) for the whole time;
- `vllm`: a real vLLM CPU hidden-state server (minutes to start); each client thread fetches samples through
  a `VllmStreamingDataset` (HTTP request, then the file on shared storage, read and deleted).

Prints one row per engine: requests, samples/s, tokens/s, errors, the server's resident memory (its whole
process tree) after warm-up and at the end, and the files left in the shared-storage folder afterwards
(there should be none). `--quick`: 20 s, 3 clients, serve_target only. A benchmark, not a timed test.
Everything binds to 127.0.0.1 and every process started here is stopped before returning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from modelopt_ext.bench.supply import (
    LOOPBACK,
    REPO,
    TINY_RECIPE,
    _one_thread_env,
    _start_serve_target,
)
from modelopt_ext.util.proc import free_port, stop_group


@dataclass
class SoakRow:
    """What one engine did under load."""

    engine: str
    clients: int
    seconds: float
    requests: int = 0
    samples: int = 0
    tokens: int = 0
    errors: int = 0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    files_left: int | None = None
    first_error: str = ""
    note: str = ""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants, in MB (from /proc)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, todo = [], [pid]
    while todo:
        cur = todo.pop()
        tree.append(cur)
        todo += [p for p, pp in parent.items() if pp == cur]
    total_kb = 0
    for p in tree:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def _batches(
    vocab: int, seed: int, batch: int = 2, length: int = 64
) -> Callable[[], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def make() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        ones = torch.ones(batch, length, dtype=torch.bool)
        return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}

    return make


def _drive(
    row: SoakRow, work: Callable[[int], tuple[int, int]], seconds: float, clients: int, pid: int
) -> None:
    """Run `work(client)` (-> samples, tokens) in `clients` threads for `seconds`; fill the row's counters."""
    lock = threading.Lock()
    warm = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(i: int) -> None:
        first = True
        while not stop.is_set():
            try:
                samples, tokens = work(i)
                with lock:
                    row.requests += 1
                    row.samples += samples
                    row.tokens += tokens
            except Exception as e:  # noqa: BLE001 - every failure is counted and the first one shown
                with lock:
                    row.errors += 1
                    row.first_error = row.first_error or f"{type(e).__name__}: {e}".splitlines()[0][:200]
            if first:
                first = False
                warm.wait()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    warm.wait()  # every client warmed up (one request each): the memory baseline
    with lock:
        row.requests = row.samples = row.tokens = row.errors = 0
    row.rss_start_mb = tree_rss_mb(pid)
    t0 = time.monotonic()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(600)
    row.seconds = time.monotonic() - t0
    row.rss_end_mb = tree_rss_mb(pid)


def soak_target(target: Path, seconds: float, clients: int, work: Path) -> SoakRow:
    """serve_target under `clients` concurrent RemoteTargetClients."""
    from modelopt_ext.supply.target_server.source import RemoteTargetClient

    vocab = int(json.loads((target / "config.json").read_text())["vocab_size"])
    row = SoakRow("serve_target", clients, seconds, note="wire format, batch 2 x 64 tokens")
    proc, url = _start_serve_target(target, work)
    try:
        conns = [RemoteTargetClient(url, use_data_plane=False) for _ in range(clients)]
        makers = [_batches(vocab, seed=i) for i in range(clients)]

        def work_one(i: int) -> tuple[int, int]:
            batch = makers[i]()
            conns[i](batch)
            return int(batch["input_ids"].shape[0]), int(batch["attention_mask"].sum())

        _drive(row, work_one, seconds, clients, proc.pid)
        for c in conns:
            c.close()
    finally:
        stop_group(proc)
    return row


def soak_vllm(target: Path, seconds: float, clients: int, work: Path) -> SoakRow:
    """A vLLM CPU hidden-state server under `clients` concurrent fetchers; counts files left behind."""
    from modelopt_ext.drafters.layers import default_capture_ids
    from modelopt_ext.supply.vllm.server import start_hidden_states_server
    from modelopt_ext.supply.vllm.source import VllmStreamingDataset
    from modelopt_ext.targets.layers import target_num_layers

    cfg = json.loads((target / "config.json").read_text())
    vocab, hidden = int(cfg["vocab_size"]), int(cfg["hidden_size"])
    root = work / "shared"
    root.mkdir(parents=True, exist_ok=True)
    row = SoakRow("vllm", clients, seconds)
    ids = default_capture_ids(target_num_layers(target))
    t0 = time.monotonic()
    handle = start_hidden_states_server(
        str(target), shared_storage=root, capture_ids=ids, host=LOOPBACK, port=free_port(), dtype="float32",
        max_model_len=512, log_path=work / "vllm.log", startup_timeout=900, die_with_parent=True,
    )  # fmt: skip
    row.note = f"1 CPU server (up in {time.monotonic() - t0:.0f} s), 64-token samples"
    try:
        g = torch.Generator().manual_seed(0)
        base = [
            {
                "input_ids": torch.randint(0, vocab, (64,), generator=g),
                "loss_mask": torch.ones(64, dtype=torch.bool),
            }
            for _ in range(256)
        ]
        ds = VllmStreamingDataset(
            base, server_urls=[handle.url], shared_storage_root=root, num_aux_layers=len(ids) - 1,
            hidden_size=hidden, local_rank=0,
        )  # fmt: skip
        counter = iter(range(10**9))
        lock = threading.Lock()

        def work_one(_i: int) -> tuple[int, int]:
            with lock:
                k = next(counter) % len(base)
            item = ds[k]
            return 1, int(item["input_ids"].numel())

        _drive(row, work_one, seconds, clients, handle.process.pid)
    finally:
        handle.stop()
    row.files_left = sum(1 for p in root.rglob("*") if p.is_file())
    return row


def format_table(rows: list[SoakRow]) -> str:
    """The soak table (and each engine's first error, if any)."""
    head = (
        f"{'engine':<13} {'clients':>7} {'seconds':>7} {'requests':>8} {'samples/s':>9} {'tokens/s':>9} "
        f"{'errors':>6} {'RSS start MB':>12} {'RSS end MB':>10} {'files left':>10}"
    )
    lines = [head]
    for r in rows:
        files = "-" if r.files_left is None else str(r.files_left)
        lines.append(
            f"{r.engine:<13} {r.clients:>7} {r.seconds:>7.0f} {r.requests:>8} {r.samples_per_s:>9.1f} "
            f"{r.tokens_per_s:>9.0f} {r.errors:>6} {r.rss_start_mb:>12.0f} {r.rss_end_mb:>10.0f} {files:>10}"
        )
    for r in rows:
        if r.note:
            lines.append(f"{r.engine}: {r.note}")
        if r.first_error:
            lines.append(f"{r.engine}: first error: {r.first_error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: soak the chosen engines, print the table; exit 1 when a request failed or files were left."""
    p = argparse.ArgumentParser(prog="python -m modelopt_ext.bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20 s, 3 clients, serve_target only.")
    p.add_argument(
        "--seconds", type=float, default=None, help="Soak time per engine (default 120; quick 20)."
    )
    p.add_argument("--clients", type=int, default=None, help="Concurrent clients (default 4; quick 3).")
    p.add_argument(
        "--engines", default=None, help="Comma-separated: target, vllm (default both; quick target)."
    )
    p.add_argument("--out", default=None, help="Also write the rows as JSON here.")
    args = p.parse_args(argv)
    seconds = args.seconds or (20.0 if args.quick else 120.0)
    clients = args.clients or (3 if args.quick else 4)
    engines = [e for e in (args.engines or ("target" if args.quick else "target,vllm")).split(",") if e]
    unknown = sorted(set(engines) - {"target", "vllm"})
    if unknown:
        p.error(f"unknown engine(s) {unknown}: use target, vllm")
    os.environ.update({k: v for k, v in _one_thread_env().items() if k in ("OMP_NUM_THREADS",)})
    from modelopt_ext.bench.train_throughput import ensure_tiny_inputs
    from modelopt_ext.config.recipe import load_recipe

    recipe = load_recipe(str(TINY_RECIPE), [])
    os.chdir(REPO)
    ensure_tiny_inputs(recipe)
    target = (REPO / recipe.model.path).resolve()
    rows = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        for engine in engines:
            work = Path(tmp) / engine
            work.mkdir()
            print(f"[soak] {engine}: {clients} clients for {seconds:.0f} s ...", flush=True)
            fn = soak_target if engine == "target" else soak_vllm
            rows.append(fn(target, seconds, clients, work))
    print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 1 if any(r.errors or r.files_left for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
