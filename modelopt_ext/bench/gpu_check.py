"""One-table device check of the trainer: `python -m modelopt_ext.bench.gpu_check [--cpu]`.

Run by `modelopt_ext/bench/gpu_check.sh` (docs/benchmarks.md) on a machine with an NVIDIA GPU, or with
`--cpu` (small sizes) anywhere. Each section runs in its own process under a time limit and becomes rows of
one table; a section that cannot run (a missing package, a failed start) is a row saying why, never a crash:

    attention   fused / chunked TTT attention vs the dense reference on the device (bf16 and fp32), grads
    train       bf16 training of the tiny EAGLE-3 head, target colocated (samples/s, peak device MB)
    serve       the same through `serve_target` (data.mode=remote) and which data plane formed (NCCL/gloo)
    memory      the TTT memory sweep (bench/ttt_memory.py) on the device
    modelopt    bench/vs_modelopt.py against nvidia-modelopt, when `modelopt` is importable

Needs torch, transformers, safetensors, tokenizers, numpy (all sections) and pydantic + pyyaml (train,
serve, modelopt: the recipe loader); no network.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.bench.gpu_check", description=__doc__.splitlines()[0]
    )
    p.add_argument("--cpu", action="store_true", help="Small CPU sizes (a smoke run of every section).")
    p.add_argument("--skip", default="", help="Comma-separated sections to leave out.")
    p.add_argument("--steps", type=int, default=None, help="Measured training steps (default 30 GPU, 5 CPU).")
    p.add_argument("--workdir", default=None, help="Scratch folder (default: a temporary one).")
    p.add_argument("--out", default=os.environ.get("OUT"), help="Write gpu_check.txt/.json and logs here.")
    p.add_argument("--attention-check", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _run(cmd: list[str], log: Path, timeout_s: float, env: dict | None = None) -> tuple[int, str]:
    """Run a section's process (its own session, so a timeout stops its children too); (rc, output)."""
    from modelopt_ext.util.proc import stop_group

    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env or os.environ.copy(),
        )
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc, signal.SIGKILL)
            rc = 124
        except BaseException:
            stop_group(proc, signal.SIGKILL)
            raise
    return rc, log.read_text(errors="replace")


def _tail(text: str, n: int = 1) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[:300] if lines else "no output"


# ------------------------------------------------------------------------------------------- sections


def attention_check() -> list[dict]:
    """In-process: fused and chunked TTT attention vs the dense form on the device; max abs errors."""
    import torch

    from modelopt_ext.drafters.eagle3.ttt_attention import fused_supported, ttt_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=dev).manual_seed(0)
        b, h, t, d, steps = 2, 8, 300, 64, 3
        am = torch.ones(b, t, dtype=torch.bool, device=dev)
        am[1, 250:] = False

        def mk(*shape, g=g, dtype=dtype):
            return torch.randn(*shape, device=dev, generator=g).to(dtype).requires_grad_()

        q = mk(b, h, t, d)
        keys = [mk(b, h // 2, t, d) for _ in range(steps)]
        values = [mk(b, h // 2, t, d) for _ in range(steps)]
        w = torch.randn(b, h, t, d, device=dev, generator=g) * am[:, None, :, None]
        results = {}
        for impl in ("dense", "chunked", "fused"):
            if impl == "fused" and not fused_supported(q):
                rows.append(
                    {
                        "section": "attention",
                        "what": f"fused {str(dtype)[6:]}",
                        "skipped": f"fused kernels do not take {dtype} on {dev} (auto uses chunked)",
                    }
                )
                continue
            try:
                out = ttt_attention(q, keys, values, am, d**-0.5, impl, chunk=64)
                grads = torch.autograd.grad((out.float() * w).sum(), [q, *keys, *values])
                results[impl] = [(out.float() * (w != 0)).detach(), *[x.float() for x in grads]]
            except Exception as e:  # noqa: BLE001 - a backend the device lacks is a row, not a crash
                rows.append(
                    {"section": "attention", "what": f"{impl} {str(dtype)[6:]}", "error": str(e)[:200]}
                )
        for impl in ("chunked", "fused"):
            if impl in results and "dense" in results:
                err = max(
                    (a - r).abs().max().item() for a, r in zip(results[impl], results["dense"], strict=True)
                )
                scale = max(r.abs().max().item() for r in results["dense"])
                tol = 1e-4 if dtype == torch.float32 else 5e-2
                rows.append(
                    {
                        "section": "attention",
                        "what": f"{impl} vs dense, {str(dtype)[6:]}",
                        "value": f"max |diff| {err:.2e} (of {scale:.1f}) out+grads",
                        "ok": err <= tol * max(1.0, scale),
                    }
                )
    return rows


def section_attention(work: Path) -> list[dict]:
    rc, out = _run(
        [sys.executable, "-m", "modelopt_ext.bench.gpu_check", "--attention-check"],
        work / "attention.log",
        300,
    )
    if rc != 0:
        return [{"section": "attention", "what": "check", "error": f"exit {rc}: {_tail(out)}"}]
    return json.loads(out.strip().splitlines()[-1])


def _train_rows(work: Path, name: str, args, extra: list[str], env: dict | None = None) -> tuple[dict, str]:
    steps = args.steps or (5 if args.cpu else 30)
    js = work / f"{name}.json"
    dtype = "float32" if args.cpu else "bfloat16"
    cmd = [
        sys.executable, "-m", "modelopt_ext.bench.train_throughput", "--steps", str(steps), "--warmup", "3",
        "--threads", "1" if args.cpu else "0", "--json", str(js), "--workdir", str(work / name),
        f"training.dtype={dtype}", *([] if args.cpu else ["model.dtype=bfloat16"]), *extra,
    ]  # fmt: skip
    rc, out = _run(cmd, work / f"{name}.log", 300 if args.cpu else 240, env)
    if rc != 0 or not js.is_file():
        return {"error": f"exit {rc}: {_tail(out)}"}, out
    return json.loads(js.read_text()), out


def section_train(work: Path, args) -> list[dict]:
    if not (_have("pydantic") and _have("yaml")):
        return [{"section": "train", "what": "colocated", "error": "needs pydantic and pyyaml (see WHEELS)"}]
    fig, _ = _train_rows(work, "train_colocated", args, [])
    if "error" in fig:
        return [{"section": "train", "what": "colocated", "error": fig["error"]}]
    return [
        {
            "section": "train",
            "what": f"colocated, {'fp32' if args.cpu else 'bf16 target+head'}, batch {fig['batch_size']}, drafter {fig['drafter']}",
            "value": f"{fig['samples_per_s']:.1f} samples/s, {fig['tokens_per_s']:.0f} tok/s, "
            f"peak {fig.get('peak_mb', float('nan')):.0f} MB ({fig.get('peak_kind', '?')})",
            "ok": True,
        }
    ]


def section_serve(work: Path, args) -> list[dict]:
    if not (_have("pydantic") and _have("yaml")):
        return [
            {"section": "serve", "what": "serve_target", "error": "needs pydantic and pyyaml (see WHEELS)"}
        ]
    from modelopt_ext.bench.supply import _start_serve_target
    from modelopt_ext.bench.train_throughput import DEFAULT_RECIPE, ensure_tiny_inputs
    from modelopt_ext.config.recipe import load_recipe
    from modelopt_ext.util.proc import stop_group

    recipe = load_recipe(str(DEFAULT_RECIPE), [])
    ensure_tiny_inputs(recipe)
    device = "cpu" if args.cpu else "cuda"
    env = {**os.environ, "MODELOPT_EXT_NCCL_PORT": "0"}
    try:
        # The server holds the target in the dtype the trainer asks for (the client checks they agree).
        dtype = "float32" if args.cpu else "bfloat16"
        proc, url = _start_serve_target((REPO / recipe.model.path).resolve(), work, device=device, dtype=dtype)
    except RuntimeError as e:
        return [{"section": "serve", "what": "serve_target start", "error": str(e).splitlines()[0][:300]}]
    try:
        fig, out = _train_rows(
            work, "train_remote", args, ["data.mode=remote", f"data.server_urls=[{url}]"], env
        )
    finally:
        stop_group(proc)
    server_log = (work / "serve_target.log").read_text(errors="replace")
    plane = "unknown"
    for text in (out, server_log):
        for backend in ("nccl", "gloo"):
            if f"formed ({backend}" in text:
                plane = backend
    # A fallback says why (e.g. NCCL refusing two ranks on one GPU): put that line in the row.
    why = [
        ln.strip()
        for ln in (out + server_log).splitlines()
        if "wire format" in ln or "data plane disabled" in ln
    ]
    if why:
        plane = f"{plane}, then wire" if plane != "unknown" else "wire"
    if "error" in fig:
        return [{"section": "serve", "what": f"serve_target ({device})", "error": fig["error"]}]
    want = "gloo" if args.cpu else "nccl"
    note = "" if plane == want else f" (expected {want}: {why[-1][-160:] if why else 'see serve_target.log'})"
    return [
        {
            "section": "serve",
            "what": f"serve_target ({device}), data plane {plane}",
            "value": f"{fig['samples_per_s']:.1f} samples/s, peak {fig.get('peak_mb', float('nan')):.0f} MB{note}",
            "ok": plane == want,
        }
    ]


def section_memory(work: Path, args) -> list[dict]:
    js = work / "memory.json"
    cmd = [sys.executable, "-m", "modelopt_ext.bench.ttt_memory", "--json", str(js)]
    if args.cpu:
        cmd += ["--quick", "--impls", "auto,dense"]
    else:
        cmd += ["--device", "cuda", "--lengths", "1024,4096,8192,16384,32768", "--impls", "auto,dense",
                "--max-mb", "60000", "--budget-mb", "131072"]  # fmt: skip
    rc, out = _run(cmd, work / "memory.log", 300 if args.cpu else 200)
    if not js.is_file():
        return [{"section": "memory", "what": "sweep", "error": f"exit {rc}: {_tail(out)}"}]
    data = json.loads(js.read_text())
    rows = []
    for r in data["rows"]:
        what = (
            f"{r['impl']}{'=' + r['backend'] if r.get('backend') not in (None, r['impl']) else ''} T={r['T']}"
        )
        if "peak_mb" in r:
            rows.append(
                {
                    "section": "memory",
                    "what": what,
                    "value": f"{r['peak_mb']:.0f} MB, {r['seconds']:.2f} s/step",
                    "ok": True,
                }
            )
        else:
            rows.append(
                {
                    "section": "memory",
                    "what": what,
                    "value": r.get("skipped") or r.get("error"),
                    "ok": "skipped" in r,
                }
            )
    for s in data["summary"]:
        rows.append(
            {
                "section": "memory",
                "what": f"{s['impl']} summary",
                "value": f"{s['mb_per_1k_tokens']:.1f} MB/1k tok, ratio {s['ratio']:.1f}x ({s['ratio_span']}), "
                f"longest T in {data['budget_mb'] / 1024:.0f} GiB {s['longest_T_in_budget']} (fit)",
                "ok": True,
            }
        )
    return rows


def section_modelopt(work: Path, args) -> list[dict]:
    if not _have("modelopt"):
        return [
            {
                "section": "modelopt",
                "what": "vs nvidia-modelopt",
                "skipped": "modelopt not importable by this interpreter (WHEELS with nvidia-modelopt adds it)",
            }
        ]
    cmd = [sys.executable, "-m", "modelopt_ext.bench.vs_modelopt", "--quick", "--python", sys.executable,
           "--json", str(work / "vs_modelopt.json")]  # fmt: skip
    if not args.cpu:
        cmd += ["--device", "cuda"]
    rc, out = _run(cmd, work / "vs_modelopt.log", 600 if args.cpu else 200)
    rows = []
    for line in out.splitlines():
        if line.startswith(("  ours", "  modelopt", "speedup", "run ")):
            rows.append(
                {"section": "modelopt", "what": line.strip()[:40], "value": line.strip()[40:], "ok": True}
            )
    if rc != 0 or not rows:
        rows.append({"section": "modelopt", "what": "vs_modelopt", "error": f"exit {rc}: {_tail(out, 2)}"})
    return rows


SECTIONS = ("attention", "train", "serve", "memory", "modelopt")


def format_table(rows: list[dict], header: str) -> str:
    """The one table."""
    lines = [header, f"{'section':10s} {'what':44s} {'ok':4s} result"]
    for r in rows:
        ok = "FAIL" if "error" in r else "skip" if "skipped" in r else ("ok" if r.get("ok") else "??")
        text = r.get("value") or r.get("error") or r.get("skipped")
        lines.append(f"{r['section']:10s} {r['what'][:44]:44s} {ok:4s} {text}")
    return "\n".join(lines)


def _header(args) -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (
        f"gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()}: python "
        f"{platform.python_version()}, torch {torch.__version__}, {dev}, mode {'cpu' if args.cpu else 'gpu'}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the sections and print the table (also to --out)."""
    args = parse_args(argv)
    if args.attention_check:
        print(json.dumps(attention_check()))
        return 0
    missing = [m for m in ("torch", "transformers", "safetensors", "numpy") if not _have(m)]
    if missing:
        print(f"error: {sys.executable} lacks {', '.join(missing)} (set PYTHON or WHEELS)", file=sys.stderr)
        return 2
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch; use --cpu for the CPU smoke run", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    funcs = {
        "attention": lambda: section_attention(work),
        "train": lambda: section_train(work, args),
        "serve": lambda: section_serve(work, args),
        "memory": lambda: section_memory(work, args),
        "modelopt": lambda: section_modelopt(work, args),
    }
    rows: list[dict] = []
    t_all = time.monotonic()
    for name in SECTIONS:
        if name in skip:
            continue
        t0 = time.monotonic()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            got = funcs[name]()
        except Exception as e:  # noqa: BLE001 - one section's failure is its row
            got = [{"section": name, "what": name, "error": f"{type(e).__name__}: {e}"[:300]}]
        rows.extend(got)
        print(f"[gpu_check] {name} done in {time.monotonic() - t0:.0f} s", flush=True)
    table = format_table(rows, _header(args))
    table += f"\ntotal {time.monotonic() - t_all:.0f} s; logs in {work}"
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from modelopt_ext.util.fileio import write_json_atomic, write_text_atomic

        write_text_atomic(out / "gpu_check.txt", table + "\n")
        write_json_atomic(out / "gpu_check.json", rows)
        for log in work.glob("*.log"):
            write_text_atomic(out / log.name, log.read_text(errors="replace"))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
