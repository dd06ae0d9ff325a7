"""Supervision supply benchmark: `python -m modelopt_ext.bench.supply [--quick] [--skip-vllm] [--out JSON]`.

Prints two tables (and writes them as JSON with --out). A benchmark, not a timed test.

1. Data plane: how fast MB-sized supervision moves between processes on this machine, per payload size
   (a Supervision-shaped dict: aux hidden states of 3 layers + the last hidden state, bf16, hidden 2048):
   - `memcpy`: clone every tensor in process (the limit of any transport);
   - `wire/http`: a loopback HTTP server in another process encodes the payload in the wire format
     (modelopt_ext/supply/target_server/wire.py) per request; the client reads the body into a bytearray and decodes it
     (checksum verified) - what serve_target's wire transport does per batch;
   - `files`: write a safetensors file under an exclusive flock on `<file>.lock` (as vLLM's connector does),
     then read it with `vllm_files.read_hidden_states` (shared lock, parse, delete) - vLLM streaming's path;
   - `gloo`: a 2-rank gloo group of two real processes on loopback; rank 0 sends the tensors, rank 1
     receives them into preallocated buffers - serve_target's data plane on CPU.
2. Training: samples/s of short tiny-target training runs (`python -m modelopt_ext.train --config
   recipes/eagle3/tiny.yaml`) fed colocated, by a real vLLM CPU hidden-state server (streaming; skipped with
   --skip-vllm) and by `python -m modelopt_ext.serve_target` (data.mode=remote), with each run's data-wait
   fraction and hidden-state bytes/sample from its metrics.json.

Everything binds to 127.0.0.1 and every process started here is stopped before returning.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import http.server
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from modelopt_ext.util.proc import LOOPBACK, free_port, stop_group

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO / "recipes" / "eagle3" / "tiny.yaml"
HIDDEN = 2048  # a ~1B-class target: payload bytes per token = (3 + 1) * 2048 * 2 + ids/masks
N_AUX = 3
FULL_SIZES_MB = (1.0, 8.0, 32.0)
QUICK_SIZES_MB = (1.0, 8.0)
TRANSPORTS = ("memcpy", "wire/http", "files", "gloo")


# ----------------------------------------------------------------------------------------------- payloads


def tokens_for(size_mb: float) -> int:
    """Tokens of one payload of about `size_mb` MB (1 MB = 1e6 bytes)."""
    per_token = (N_AUX + 1) * HIDDEN * 2 + 8 + 1 + 1
    return max(1, round(size_mb * 1e6 / per_token))


def make_payload(size_mb: float) -> dict[str, torch.Tensor]:
    """A Supervision-shaped dict of about `size_mb` MB (batch 1, target form = last hidden state)."""
    t = tokens_for(size_mb)
    g = torch.Generator().manual_seed(t)
    return {
        "input_ids": torch.randint(0, 32000, (1, t), generator=g),
        "attention_mask": torch.ones(1, t, dtype=torch.bool),
        "loss_mask": torch.ones(1, t, dtype=torch.bool),
        "aux_hidden_states": torch.randn(1, t, N_AUX * HIDDEN, generator=g).to(torch.bfloat16),
        "target_last_hidden": torch.randn(1, t, HIDDEN, generator=g).to(torch.bfloat16),
    }


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Raw tensor bytes of a payload."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _time_per_call(fn, iters: int) -> float:
    """Median seconds per call over `iters` calls after one warm-up (allocations, connections, page cache).

    The median, not the mean: on a small shared machine one descheduled call would dominate the mean.
    """
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------- memcpy


def bench_memcpy(tensors: dict[str, torch.Tensor], iters: int) -> float:
    """Seconds per in-process copy of every tensor into preallocated buffers (no allocation, no page faults)."""
    pairs = [(torch.empty_like(t), t) for t in tensors.values()]
    return _time_per_call(lambda: [dst.copy_(src) for dst, src in pairs], iters)


# ---------------------------------------------------------------------------------------------- wire/http


def _http_server_main(port_q, sizes_mb: list[float]) -> None:
    """Child process: serve GET /<index> -> the wire encoding of payload <index>, encoded per request."""
    from modelopt_ext.supply.target_server import wire
    torch.set_num_threads(1)
    payloads = [make_payload(s) for s in sizes_mb]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the remote client does

        def do_GET(self) -> None:
            chunks, total = wire.encode_chunks(payloads[int(self.path.strip("/"))])
            self.send_response(200)
            self.send_header("Content-Type", wire.CONTENT_TYPE)
            self.send_header("Content-Length", str(total))
            self.end_headers()
            for c in chunks:
                self.wfile.write(c)

        def log_message(self, *args) -> None:  # quiet
            pass

    srv = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
    port_q.put(srv.server_address[1])
    srv.serve_forever()


def bench_wire_http(sizes_mb: list[float], iters: int, ctx) -> list[float]:
    """Seconds per payload (request, encode, transfer, read into a bytearray, decode) per size."""
    from modelopt_ext.supply.target_server import wire
    q = ctx.Queue()
    proc = ctx.Process(target=_http_server_main, args=(q, list(sizes_mb)), daemon=True)
    proc.start()
    try:
        port = q.get(timeout=120)
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=120)

        def fetch(i: int) -> None:
            conn.request("GET", f"/{i}")
            resp = conn.getresponse()
            buf = bytearray(int(resp.headers["Content-Length"]))
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = resp.readinto(view[got:])
                if not n:
                    raise RuntimeError("wire/http: short body")
                got += n
            wire.decode(buf)

        out = [_time_per_call(lambda i=i: fetch(i), iters) for i in range(len(sizes_mb))]
        conn.close()
        return out
    finally:
        proc.terminate()
        proc.join(10)


# -------------------------------------------------------------------------------------------------- files


def _write_locked(path: str, blob: bytes) -> None:
    """Write like vLLM's connector: exclusive flock on <path>.lock while the file is written."""
    lock_fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        with open(path, "wb") as f:
            f.write(blob)
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
    finally:
        os.close(lock_fd)


def bench_files(tensors: dict[str, torch.Tensor], iters: int, root: Path) -> float:
    """Seconds per payload: serialize + locked write, then the lock-protocol read + parse + delete."""
    from safetensors.torch import save as st_save

    from modelopt_ext.supply.vllm.files import read_hidden_states

    path = str(root / "bench_payload.safetensors")

    def once() -> None:
        _write_locked(path, st_save(tensors))
        read_hidden_states(path, root, lock_timeout_s=30)

    return _time_per_call(once, iters)


# --------------------------------------------------------------------------------------------------- gloo


def _gloo_rank(rank: int, port: int, sizes_mb: list[float], iters: int, q, go) -> None:
    """Child process: one rank of a 2-rank gloo group; rank 1 reports seconds per payload per size."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if not go.wait(600):  # started early so its imports overlap the other transports; measure alone
        return
    dist.init_process_group(
        "gloo", init_method=f"tcp://{LOOPBACK}:{port}", rank=rank, world_size=2,
    )  # fmt: skip
    try:
        results = []
        for size in sizes_mb:
            # Byte views: gloo has no bool kernels; a transport moves bytes anyway.
            bufs = [t.contiguous().view(-1).view(torch.uint8) for t in make_payload(size).values()]
            times = []
            for it in range(iters + 1):  # the first is a warm-up
                dist.barrier()
                t0 = time.perf_counter()
                for b in bufs:
                    if rank == 0:
                        dist.send(b, dst=1)
                    else:
                        dist.recv(b, src=0)
                if it:
                    times.append(time.perf_counter() - t0)
            results.append(statistics.median(times))
        if rank == 1:
            q.put(results)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def start_gloo(sizes_mb: list[float], iters: int, ctx) -> tuple[list, object, object]:
    """Start the two gloo ranks (they import torch, then wait for `go.set()`); (processes, queue, go)."""
    q, go = ctx.Queue(), ctx.Event()
    port = free_port()
    args = (port, list(sizes_mb), iters, q, go)
    procs = [ctx.Process(target=_gloo_rank, args=(r, *args), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    return procs, q, go


def finish_gloo(procs: list, q, go) -> list[float]:
    """Let the ranks run; seconds per payload received by rank 1, per size. Stops both ranks."""
    go.set()
    deadline = time.monotonic() + 300
    try:
        while True:
            try:
                return q.get(timeout=1)
            except queue.Empty:
                # A rank that died (e.g. the group did not form) never reports: fail fast, not at the deadline.
                if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                    with contextlib.suppress(queue.Empty):
                        return q.get(timeout=5)  # it may have reported just before exiting
                    codes = [p.exitcode for p in procs]
                    raise RuntimeError(
                        f"gloo: the 2-rank group did not report (exit codes {codes})"
                    ) from None
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(10)


def data_plane_rows(sizes_mb: list[float], iters: int, storage: Path | None = None) -> list[dict]:
    """One row per (transport, payload size): MB per payload, ms per payload, MB/s.

    Transports are measured one after the other (never two at once); only the child processes' start-up
    overlaps.
    """
    ctx = mp.get_context("spawn")  # children import torch fresh; no forked OpenMP/gloo state
    gloo = start_gloo(sizes_mb, iters, ctx)
    try:
        payloads = [make_payload(s) for s in sizes_mb]
        nbytes = [payload_bytes(p) for p in payloads]
        secs: dict[str, list[float]] = {"memcpy": [bench_memcpy(p, iters) for p in payloads]}
        secs["wire/http"] = bench_wire_http(sizes_mb, iters, ctx)
        with tempfile.TemporaryDirectory(prefix="supply_bench_", dir=storage) as d:
            secs["files"] = [bench_files(p, iters, Path(d)) for p in payloads]
    finally:
        gloo_secs = finish_gloo(*gloo)
    secs["gloo"] = gloo_secs
    rows = []
    for name in TRANSPORTS:
        for nb, s in zip(nbytes, secs[name]):
            rows.append({"transport": name, "mb": nb / 1e6, "ms": s * 1e3, "mb_per_s": nb / s / 1e6})
    return rows


# ----------------------------------------------------------------------------------------------- training


def _train(out: Path, steps: int, overrides: list[str], log: Path, timeout_s: float) -> dict:
    """Run the tiny recipe for `steps` steps; the figures of its metrics.json."""
    cmd = [
        sys.executable, "-m", "modelopt_ext.train", "--config", str(TINY_RECIPE),
        f"training.output_dir={out}", f"training.max_steps={steps}", f"training.save_interval={steps}",
        f"training.log_interval={max(1, steps // 4)}", "training.export_at_end=false", *overrides,
    ]  # fmt: skip
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=_one_thread_env()
        )
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise RuntimeError(f"training run timed out after {timeout_s:.0f} s (log {log})") from None
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): never leave a trainer behind
            stop_group(proc)
            raise
    if rc != 0:
        raise RuntimeError(f"training run failed (exit {rc}, log {log}): {log.read_text()[-600:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {
        "samples_per_s": m["samples_per_s"],
        "tokens_per_s": m["tokens_per_s"],
        "data_wait_frac": m["data_wait_frac"],
        "bytes_per_sample": m.get("hs_bytes_per_sample"),
        "steps": m["steps"],
        "wall_s": m["wall_time_s"],
    }


def _one_thread_env() -> dict:
    # One torch thread per process: on a small shared machine spinning OpenMP threads cost several x, and
    # every mode then gets the same compute per process (the server's and the trainer's).
    return {**os.environ, "OMP_NUM_THREADS": "1", "MODELOPT_EXT_NCCL_PORT": "0"}


def _start_serve_target(
    target: Path, tmp: Path, device: str = "cpu", dtype: str = "auto"
) -> tuple[subprocess.Popen, str]:
    from modelopt_ext.supply.target_server.process import start_serve_target

    args = ["--target", str(target), "--host", LOOPBACK, "--port", "0", "--device", device, "--dtype", dtype,
            "--threads", "1"]  # fmt: skip
    return start_serve_target(args, tmp, env=_one_thread_env(), cwd=REPO)


def training_rows(steps: int, skip_vllm: bool, work: Path, log=print) -> list[dict]:
    """One row per supply mode on the tiny target: samples/s, data-wait fraction, bytes/sample (or an error)."""
    from modelopt_ext.bench.train_throughput import ensure_tiny_inputs
    from modelopt_ext.config.recipe import load_recipe

    recipe = load_recipe(str(TINY_RECIPE), [])
    ensure_tiny_inputs(recipe)
    target = (REPO / recipe.model.path).resolve()
    timeout = 120 + 20 * steps
    rows = []

    def run(mode: str, overrides: list[str], note: str) -> None:
        log(f"[supply] training: {mode} ({steps} steps) ...", flush=True)
        row = {"mode": mode, "note": note}
        try:
            row.update(_train(work / mode, steps, overrides, work / f"{mode}.log", timeout))
        except RuntimeError as e:
            row["error"] = str(e).splitlines()[0]
        rows.append(row)

    run("colocated", [], "target in the trainer")
    if skip_vllm:
        rows.append({"mode": "vllm streaming", "note": "skipped (--skip-vllm)", "skipped": True})
    else:
        from modelopt_ext.drafters.layers import recipe_layer_ids
        from modelopt_ext.supply.vllm.server import start_hidden_states_server
        from modelopt_ext.targets.layers import capture_layer_ids, target_num_layers

        root = work / "shared"
        log("[supply] starting a vLLM CPU hidden-state server (minutes) ...", flush=True)
        t0 = time.monotonic()
        try:
            handle = start_hidden_states_server(
                str(target), shared_storage=root, capture_ids=capture_layer_ids(
                    target_num_layers(target), recipe_layer_ids(recipe)),
                host=LOOPBACK, port=free_port(), dtype="float32", max_model_len=512,
                log_path=work / "vllm.log", startup_timeout=600, die_with_parent=True,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - report the row as failed, keep the other rows
            rows.append({"mode": "vllm streaming", "note": "server start failed", "error": str(e)})
        else:
            try:
                run(
                    "vllm streaming",
                    [f"data.server_urls=[{handle.url}]", f"data.shared_storage_root={root}"],
                    f"1 vLLM CPU server (up in {time.monotonic() - t0:.0f} s)",
                )
            finally:
                handle.stop()
    try:
        proc, url = _start_serve_target(target, work)
    except RuntimeError as e:
        rows.append({"mode": "serve_target", "note": "server start failed", "error": str(e).splitlines()[0]})
        return rows
    try:
        run("serve_target", ["data.mode=remote", f"data.server_urls=[{url}]"], "remote, 1 server, 1 thread")
    finally:
        stop_group(proc)
    return rows


# ------------------------------------------------------------------------------------------------ tables


def format_tables(result: dict) -> str:
    """The printed tables."""
    lines = [
        f"supply benchmark {result['date']} on {result['machine']}",
        "",
        (
            f"data plane (payload = Supervision-shaped dict: {N_AUX} aux + last hidden, bf16, hidden {HIDDEN}; "
            f"{result['iters']} iters)"
        ),
        f"{'transport':<11} {'MB':>7} {'ms/payload':>11} {'MB/s':>9}",
    ]
    for r in result["data_plane"]:
        lines.append(f"{r['transport']:<11} {r['mb']:>7.2f} {r['ms']:>11.2f} {r['mb_per_s']:>9.0f}")
    if result.get("training") is not None:
        lines.append("")
        lines.append(f"training on the tiny target ({result['train_steps']} steps, tiny.yaml, batch 8)")
        lines.append(f"{'supply':<15} {'samples/s':>9} {'data wait':>9} {'bytes/sample':>13}  note")
        for r in result["training"]:
            if "samples_per_s" in r:
                bps = r.get("bytes_per_sample")
                bps_s = (
                    f"{bps:>13,.0f}" if isinstance(bps, (int, float)) and math.isfinite(bps) else f"{'-':>13}"
                )
                lines.append(
                    f"{r['mode']:<15} {r['samples_per_s']:>9.2f} {100 * r['data_wait_frac']:>8.1f}% {bps_s}  {r['note']}"
                )
            else:
                lines.append(f"{r['mode']:<15} {'-':>9} {'-':>9} {'-':>13}  {r.get('error') or r['note']}")
    return "\n".join(lines)


def _machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.node()} ({os.cpu_count()} cores, load {load:.1f}, torch {torch.__version__})"


def _sizes(text: str) -> list[float]:
    try:
        sizes = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes-mb {text!r}: expected numbers like 1,8,32") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"--sizes-mb {text!r}: sizes must be > 0")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.bench.supply", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="smaller payloads (1, 8 MB), fewer iters and steps")
    p.add_argument(
        "--skip-vllm", action="store_true", help="no vLLM streaming row (its server takes minutes)"
    )
    p.add_argument("--skip-train", action="store_true", help="data-plane table only")
    p.add_argument(
        "--sizes-mb", type=_sizes, default=None, help="payload sizes, e.g. 1,8,32 (default by mode)"
    )
    p.add_argument("--iters", type=int, default=None, help="timed payloads per transport and size")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training run")
    p.add_argument("--storage", default=None, help="folder for the files transport (default: the temp dir)")
    p.add_argument("--out", default=None, help="also write the results here as JSON")
    args = p.parse_args(argv)
    if (args.iters is not None and args.iters < 1) or (args.steps is not None and args.steps < 2):
        p.error("--iters must be >= 1 and --steps >= 2")
    if args.storage and not Path(args.storage).is_dir():
        p.error(f"--storage {args.storage}: not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables, optionally write JSON."""
    args = parse_args(argv)
    sizes = args.sizes_mb or list(QUICK_SIZES_MB if args.quick else FULL_SIZES_MB)
    iters = args.iters or (3 if args.quick else 10)
    steps = args.steps or (10 if args.quick else 20)
    torch.set_num_threads(1)  # transports are single-threaded copies; do not fight the 2 shared cores
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": _machine(),
        "iters": iters,
        "data_plane": data_plane_rows(sizes, iters, Path(args.storage) if args.storage else None),
        "training": None,
        "train_steps": steps,
    }
    if not args.skip_train:
        # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every server and trainer started here.
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            with tempfile.TemporaryDirectory(prefix="supply_train_") as d:
                result["training"] = training_rows(steps, args.skip_vllm, Path(d))
        finally:
            signal.signal(signal.SIGTERM, previous)
    print(format_tables(result), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
