"""Peak training memory of the draft head vs sequence length: `python -m modelopt_ext.bench.ttt_memory`.

One forward+backward of the EAGLE-3 head alone (default: hidden 256, 4 heads, vocab 4096, 3 TTT steps,
batch 1, fp32 on CPU / bf16 autocast on GPU) per (attention backend, T), each on CPU in a fresh process so
its peak RSS growth is its own (on GPU: torch's peak allocated bytes). Prints a table of peak MB and s/step,
then per backend MB per 1k tokens, the largest/smallest-T memory ratio (linear = the T ratio, quadratic =
its square) and the longest T whose peak fits `--budget-mb` (extrapolated from the measured points: an
estimate, said so). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_TS = (1024, 4096, 8192, 16384)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.bench.ttt_memory", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--lengths", default=",".join(map(str, DEFAULT_TS)), help="Comma-separated sequence lengths."
    )
    p.add_argument("--impls", default="auto,dense", help="Attention backends (auto, fused, chunked, dense).")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available).")
    p.add_argument(
        "--max-mb",
        type=float,
        default=6000,
        help="Skip a point whose peak the fit of the smaller ones predicts above this (keeps the quadratic "
        "dense form from exhausting a small machine); printed as 'skipped'.",
    )
    p.add_argument("--budget-mb", type=float, default=16384, help="Memory budget for 'longest T that fits'.")
    p.add_argument("--quick", action="store_true", help="T = 256, 1024 only (tests, smoke runs).")
    p.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_point(impl: str, t: int, args: argparse.Namespace) -> dict:
    """One forward+backward at length t: {peak_mb (growth over the baseline), seconds}."""
    import torch

    from modelopt_ext.drafters.eagle3.modeling import Eagle3Config, Eagle3DraftModel

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    cfg = Eagle3Config(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.hidden // args.heads,
        vocab_size=args.vocab,
        draft_vocab_size=args.vocab,
        aux_layer_ids=[1, 2, 3],
        max_position_embeddings=max(4096, t + 16),
    )
    torch.manual_seed(0)
    model = Eagle3DraftModel(cfg).to(dev)
    model.attention_impl = impl
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, t), device=dev, generator=g)
    aux = torch.randn(1, t, 3 * args.hidden, device=dev, generator=g)
    labels = torch.randint(0, args.vocab, (1, t), device=dev, generator=g)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None

    def step() -> None:
        with autocast or _null():
            loss = 0
            for lg, _ in model.ttt(ids, aux, None, args.ttt_steps):
                loss = loss + torch.nn.functional.cross_entropy(lg.float().flatten(0, 1), labels.flatten())
        loss.backward()

    if dev.type == "cuda":
        step()  # warm the kernels and the allocator; the peak below is one step's
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = _rss_mb()
        t0 = time.perf_counter()
        step()
        secs = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    from modelopt_ext.drafters.eagle3.ttt_attention import resolve_impl

    probe = torch.empty(
        1, 1, 1, cfg.head_dim, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32
    )
    backend = impl if impl == "dense" else resolve_impl(impl, probe, True)
    return {
        "impl": impl,
        "backend": backend,
        "T": t,
        "peak_mb": round(peak, 1),
        "seconds": round(secs, 3),
        "device": dev.type,
    }


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _fit(points: list[tuple[int, float]]) -> np.ndarray:
    """Least-squares coefficients (a, b, c) of peak = a + b T + c T^2 (c = 0 with fewer than 3 points)."""
    t = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    if len(points) >= 3:
        coef = np.linalg.lstsq(np.stack([np.ones_like(t), t, t * t], 1), y, rcond=None)[0]
        if coef[2] > 0:
            return coef
        # no measurable curvature (a linear backend): a straight line, so the extrapolation stays bounded
        return np.array([*np.linalg.lstsq(np.stack([np.ones_like(t), t], 1), y, rcond=None)[0], 0.0])
    if len(points) == 2:
        b = (y[1] - y[0]) / (t[1] - t[0])
        return np.array([y[0] - b * t[0], b, 0.0])
    return np.array([0.0, y[0] / t[0], 0.0])


def _longest_within(points: list[tuple[int, float]], budget: float) -> int:
    """Largest T (multiple of 256, at most 2^22) whose predicted peak is <= budget: the fit a + bT + cT^2
    from three or more points, else the power law through the last two (a quadratic form's exponent shows
    from two points, a straight line would understate it)."""
    if len(points) >= 3:
        coef = _fit(points)

        def peak(t: float) -> float:
            return float(coef[0] + coef[1] * t + coef[2] * t * t)
    else:
        (t1, y1), (t2, y2) = points[0], points[-1]
        expo = np.log(max(y2, 1e-9) / max(y1, 1e-9)) / np.log(t2 / t1) if t2 != t1 else 1.0

        def peak(t: float) -> float:
            return float(y2 * (t / t2) ** expo)

    lo, hi = 0, 256
    while hi < 2**22 and peak(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256
        lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid)
    return lo


def _worker_cmd(impl: str, t: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "modelopt_ext.bench.ttt_memory", *argv, "--worker", impl, str(t)]


def sweep(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """Every (impl, T), each in its own process; a point predicted above --max-mb is skipped."""
    lengths = [256, 1024] if args.quick else [int(x) for x in args.lengths.split(",") if x]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = []
    for impl in [x.strip() for x in args.impls.split(",") if x.strip()]:
        done: list[tuple[int, float]] = []
        for t in sorted(lengths):
            if len(done) >= 2:
                # the dense form grows ~T^2: predict from the last two points' growth exponent
                (t1, y1), (t2, y2) = done[-2], done[-1]
                expo = np.log(max(y2, 1.0) / max(y1, 1.0)) / np.log(t2 / t1)
                predicted = y2 * (t / t2) ** max(expo, 1.0)
                if predicted > args.max_mb:
                    rows.append({"impl": impl, "T": t, "skipped": f"predicted {predicted:.0f} MB > --max-mb"})
                    print(f"  {impl:8s} T={t:6d}: skipped (predicted {predicted:.0f} MB)", flush=True)
                    continue
            t0 = time.perf_counter()
            r = subprocess.run(
                _worker_cmd(impl, t, argv), capture_output=True, text=True, env=env, timeout=3600, check=False
            )
            if r.returncode != 0:
                tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"impl": impl, "T": t, "error": tail[:200]})
                print(f"  {impl:8s} T={t:6d}: failed: {tail[:200]}", flush=True)
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            done.append((t, row["peak_mb"]))
            print(
                f"  {impl:8s} T={t:6d}: {row['peak_mb']:9.1f} MB  {row['seconds']:7.2f} s/step "
                f"({time.perf_counter() - t0:.0f} s with start-up)",
                flush=True,
            )
    return rows


def summarize(rows: list[dict], budget_mb: float) -> list[dict]:
    """Per backend: MB per 1k tokens (slope of the fit's linear part at the measured span), the
    largest/smallest-T ratio and the longest T within the budget (fit)."""
    out = []
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = [(r["T"], r["peak_mb"]) for r in rows if r["impl"] == impl and "peak_mb" in r]
        if not pts:
            continue
        (t_lo, y_lo), (t_hi, y_hi) = pts[0], pts[-1]
        out.append(
            {
                "impl": impl,
                "mb_per_1k_tokens": round(1000 * y_hi / t_hi, 1),
                "ratio": round(y_hi / max(y_lo, 1e-9), 1),
                "ratio_span": f"{t_hi // 1024 or t_hi}k/{t_lo // 1024 or t_lo}k"
                if t_lo >= 1024
                else f"{t_hi}/{t_lo}",
                "token_ratio": t_hi / t_lo,
                "longest_T_in_budget": _longest_within(pts, budget_mb),
            }
        )
    return out


def format_tables(rows: list[dict], summary: list[dict], args: argparse.Namespace, device: str) -> str:
    """The printed tables."""
    lines = [
        (
            f"TTT memory sweep: head hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}, "
            f"{args.ttt_steps} TTT steps, batch 1, forward+backward, {device}"
        ),
        f"{'attention':13s} {'T':>7s} {'peak MB':>10s} {'s/step':>8s}",
    ]
    for r in rows:
        if "peak_mb" in r:
            name = r["impl"] if r.get("backend") in (None, r["impl"]) else f"{r['impl']}={r['backend']}"
            lines.append(f"{name:13s} {r['T']:7d} {r['peak_mb']:10.1f} {r['seconds']:8.2f}")
        else:
            lines.append(f"{r['impl']:13s} {r['T']:7d} {r.get('skipped') or r.get('error')}")
    lines.append(
        f"{'attention':10s} {'MB/1k tok':>10s} {'peak ratio':>18s} {'longest T in ' + str(int(args.budget_mb)) + ' MB (fit)':>30s}"
    )
    for s in summary:
        ratio = f"{s['ratio']:.1f}x ({s['ratio_span']})"
        lines.append(
            f"{s['impl']:10s} {s['mb_per_1k_tokens']:10.1f} {ratio:>18s} {s['longest_T_in_budget']:>30d}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or one worker point) and print the tables."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_point(args.worker[0], int(args.worker[1]), args)))
        return 0
    rows = sweep(args, argv)
    device = next((r["device"] for r in rows if "device" in r), args.device)
    summary = summarize(rows, args.budget_mb)
    print(format_tables(rows, summary, args, device))
    if args.json:
        from modelopt_ext.util.fileio import write_json_atomic

        write_json_atomic(Path(args.json), {"rows": rows, "summary": summary, "budget_mb": args.budget_mb})
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
