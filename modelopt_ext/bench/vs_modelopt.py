"""Side by side with nvidia-modelopt: `python -m modelopt_ext.bench.vs_modelopt [--quick]`.

Trains EAGLE-3 on the same tiny target, data, batch, steps and TTT steps twice (or more) in ONE run:
ours (`modelopt_ext.bench.train_throughput`, the real trainer, colocated target) and nvidia-modelopt's
(`modelopt_ext/bench/modelopt_runner.py`: `modelopt.torch.speculative.convert` + a transformers `Trainer`,
as Model-Optimizer's examples do), eager and, unless --quick, with its torch.compile option. Then measures
each export's acceptance length with our `specdec_bench` on the same prompts. Prints one table; the last
line reads `speedup vs nvidia-modelopt eager: <X.XX>x`.

nvidia-modelopt runs in its own virtual environment (`.cache/vs-modelopt/venv`, built on first use with pip:
the pinned `nvidia-modelopt[hf]` and this machine's torch wheel), or under `--python` (an interpreter that
already has it, e.g. on a GPU machine). Every process gets `--threads` torch threads.

Model-Optimizer's export nests its aux layer ids under `eagle_config` only, as 0-based decoder-layer
OUTPUTS; our numbering (vLLM's) counts the embeddings as 0, so its id i is our i + 1. The benchmark writes a
copy of its export folder whose config carries the mapped ids at the top level, so that specdec_bench reads
the layers modelopt trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELOPT_PIN = "nvidia-modelopt[hf]==0.47.0"
TORCH_PIN = "torch==2.13.0"
VENV = REPO / ".cache" / "vs-modelopt" / "venv"
RUNNER = Path(__file__).resolve().parent / "modelopt_runner.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.bench.vs_modelopt", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="Few steps, no compiled rows, few prompts (minutes).")
    p.add_argument("--steps", type=int, default=None, help="Measured steps per run (default 40; quick 8).")
    p.add_argument("--warmup", type=int, default=None, help="Unmeasured first steps (default 3; quick 2).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process.")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--python", default=None, help="Interpreter with nvidia-modelopt (default: build a venv).")
    p.add_argument("--no-compile", action="store_true", help="Leave out the compiled rows.")
    p.add_argument(
        "--rounds", type=int, default=None, help="Alternating rounds of the eager rows (default 2; quick 1)."
    )
    p.add_argument("--prompts", type=int, default=None, help="Acceptance prompts (default 16; quick 4).")
    p.add_argument("--workdir", default=None, help="Scratch folder (default: a temporary one).")
    p.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    p.add_argument(
        "overrides", nargs="*", help="Recipe overrides for OUR run only (e.g. training.compile=true)."
    )
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[vs_modelopt] {msg}", flush=True)


def ensure_venv() -> Path:
    """The comparison venv's python, built once (under a lock) with the pinned packages."""
    from modelopt_ext.util.fileio import exclusive_lock

    py = VENV / "bin" / "python"
    stamp = VENV / ".pins"
    pins = f"{MODELOPT_PIN} {TORCH_PIN}"
    with exclusive_lock(VENV.parent / "venv.lock", timeout_s=1800, what="the nvidia-modelopt venv build"):
        if py.is_file() and stamp.is_file() and stamp.read_text().strip() == pins:
            return py
        log(f"building {VENV} with {pins} (pip; minutes, once) ...")
        shutil.rmtree(VENV, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        # torch first, from this machine's wheel (pip's own config finds it), so modelopt does not pull another.
        subprocess.run([*pip, TORCH_PIN], check=True)
        subprocess.run([*pip, MODELOPT_PIN, TORCH_PIN], check=True)
        stamp.write_text(pins + "\n")
    return py


def prepare(work: Path, ttt_steps: int) -> dict:
    """The tiny target and conversations; the tokenized items both trainers read; the shared settings."""
    from transformers import AutoConfig, AutoTokenizer

    from modelopt_ext.bench.train_throughput import DEFAULT_RECIPE, ensure_tiny_inputs
    from modelopt_ext.config.recipe import load_recipe
    from modelopt_ext.data.dataset import ConversationDataset

    recipe = load_recipe(str(DEFAULT_RECIPE), [])
    ensure_tiny_inputs(recipe)
    target = (REPO / recipe.model.path).resolve()
    tok = AutoTokenizer.from_pretrained(str(target))
    ds = ConversationDataset(recipe.data, tok, work / "cache", log=lambda m: None)
    items = [ds[i] for i in range(len(ds))]
    import torch

    # Padding waste of batch-max padding (what our collate does) over random batches of this data.
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(items), generator=g).tolist()
    lens = [len(items[i]["input_ids"]) for i in order]
    bs = 8
    chunks = [lens[i : i + bs] for i in range(0, len(lens) - bs + 1, bs)]
    waste = 1 - sum(map(sum, chunks)) / sum(len(c) * max(c) for c in chunks)
    data = work / "items.pt"
    torch.save({"items": items}, data)
    cfg = AutoConfig.from_pretrained(str(target))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "recipe": recipe,
        "target": target,
        "data": data,
        "vocab": int(cfg.vocab_size),
        "aux_ids": list(recipe.model.aux_layer_ids),
        "arch": {
            "intermediate_size": int(cfg.intermediate_size),
            "num_attention_heads": int(cfg.num_attention_heads),
            "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
            "head_dim": int(head_dim),
            "rms_norm_eps": float(getattr(cfg, "rms_norm_eps", 1e-6)),
            "draft_vocab_size": int(cfg.vocab_size),
            "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", 4096)),
        },
        "prompts": REPO / recipe.data.path,
        "batch_max_padding_waste": waste,
    }


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def run_ours(work: Path, name: str, setup: dict, args, steps: int, warmup: int, extra: list[str]) -> dict:
    """Our trainer on the same settings; figures + the checkpoint folder it saved at the end."""
    recipe = setup["recipe"]
    out = work / name
    js = work / f"{name}.json"
    cmd = [
        sys.executable, "-m", "modelopt_ext.bench.train_throughput", "--steps", str(steps), "--warmup", str(warmup),
        "--threads", str(args.threads), "--workdir", str(out), "--json", str(js),
        f"training.batch_size={args.batch_size}", f"eagle.ttt_steps={args.ttt_steps}",
        f"eagle.draft_vocab_size={setup['vocab']}", "training.schedule=constant", "training.warmup_steps=0",
        f"training.lr={recipe.training.lr}", "training.max_grad_norm=1.0",
        *(["training.dtype=bfloat16"] if args.device == "cuda" else []), *extra,
    ]  # fmt: skip
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(args.threads), check=False)
    (work / f"{name}.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0 or not js.is_file():
        raise RuntimeError(f"{name}: exit {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    fig = json.loads(js.read_text())
    ckpts = sorted((out / "out").glob("epoch_*_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    fig["draft"] = str(ckpts[-1]) if ckpts else None
    fig["padding_waste"] = setup["batch_max_padding_waste"]
    fig["wall_s"] = time.monotonic() - t0
    return fig


def run_modelopt(
    work: Path,
    name: str,
    setup: dict,
    args,
    py: str,
    steps: int,
    warmup: int,
    compile_: bool,
    fixed: bool = False,
) -> dict:
    """nvidia-modelopt's trainer (modelopt_runner.py under its interpreter); figures + its export folder."""
    spec = {
        "target": str(setup["target"]),
        "data": str(setup["data"]),
        # fixed: pad every batch to data.max_length (its example's collator); else the batch's longest row.
        "pad_to": setup["recipe"].data.max_length if fixed else 0,
        "batch_size": args.batch_size,
        "steps": steps,
        "warmup": warmup,
        "ttt_steps": args.ttt_steps,
        "lr": setup["recipe"].training.lr,
        "step_decay": setup["recipe"].drafter_settings.step_loss_decay,
        # modelopt numbers aux layers as 0-based decoder-layer outputs: our (vLLM) id k is its k - 1.
        "aux_ids_0based": [i - 1 for i in setup["aux_ids"]],
        "arch": setup["arch"],
        "compile": compile_,
        "device": args.device,
        "bf16": args.device == "cuda",
        "export_dir": str(work / name / "export"),
        "seed": 0,
        "threads": args.threads,
    }
    spec_file = work / f"{name}.spec.json"
    spec_file.write_text(json.dumps(spec))
    t0 = time.monotonic()
    r = subprocess.run([py, str(RUNNER), str(spec_file)], cwd=work, capture_output=True, text=True,
                       env=_env(args.threads), check=False)  # fmt: skip
    (work / f"{name}.log").write_text(r.stdout + r.stderr)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode != 0 or not last.startswith("{"):
        raise RuntimeError(f"{name}: exit {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    fig = json.loads(last)
    fig["draft"] = map_modelopt_export(Path(fig["export_dir"]), work / name / "export-mapped")
    fig["wall_s"] = time.monotonic() - t0
    return fig


def map_modelopt_export(src: Path, dst: Path) -> str:
    """A copy of a Model-Optimizer export whose config has top-level aux ids in our numbering (0-based
    layer outputs + 1); the weights are linked, not rewritten."""
    cfg = json.loads((src / "config.json").read_text())
    nested = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if not nested:
        raise RuntimeError(f"{src}/config.json: no eagle_config.eagle_aux_hidden_state_layer_ids")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and f.is_file():
            target = dst / f.name
            target.unlink(missing_ok=True)
            target.symlink_to(f.resolve())
    cfg["eagle_aux_hidden_state_layer_ids"] = [int(i) + 1 for i in nested]
    cfg["modelopt_ext_note"] = (
        "aux ids mapped from eagle_config (0-based layer outputs) to vLLM numbering (+1)"
    )
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(dst)


def acceptance(work: Path, name: str, setup: dict, draft: str | None, prompts: int, args) -> dict:
    """specdec_bench on the tiny target: mean acceptance length (greedy chain of ttt_steps drafts)."""
    if not draft:
        return {"error": "no drafter folder"}
    out = work / f"{name}.accept.json"
    cmd = [
        sys.executable, "-m", "modelopt_ext.specdec_bench", "--target", str(setup["target"]), "--draft", draft,
        "--prompts", str(setup["prompts"]), "--num-steps", str(args.ttt_steps), "--max-prompts", str(prompts),
        "--max-new-tokens", "48", "--out", str(out), "--device", args.device,
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(args.threads), check=False)
    (work / f"{name}.accept.log").write_text(r.stdout + r.stderr)
    if not out.is_file():
        return {
            "error": f"specdec_bench exit {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
        }
    res = json.loads(out.read_text())
    return {
        "accept_len": res["mean_acceptance_length"],
        "outputs_match_greedy": res.get("outputs_match_greedy"),
    }


def format_table(rows: list[dict], meta: dict) -> str:
    """The printed table; the last line is the speedup over nvidia-modelopt eager."""
    lines = [
        (
            f"vs nvidia-modelopt: tiny target, batch {meta['batch_size']} x <= {meta['max_length']} tokens, "
            f"{meta['ttt_steps']} TTT steps, full vocabulary ({meta['vocab']}), {meta['dtype']}, "
            f"{meta['device']}, {meta['threads']} torch thread(s), {meta['steps']} measured steps after "
            f"{meta['warmup']}, best of {meta.get('rounds', 1)} alternating round(s)"
        ),
        (
            f"{'run':28s} {'samples/s':>9s} {'vs mo eager':>11s} {'samples/CPU-s':>13s} {'vs mo':>6s} "
            f"{'peak MB':>8s} {'first step s':>12s} {'padding':>8s} {'accept len':>10s}"
        ),
    ]
    base = next((r for r in rows if r["run"] == "modelopt eager" and "samples_per_s" in r), None)
    for r in rows:
        if "samples_per_s" not in r:
            lines.append(f"  {r['run']:26s} {r.get('error', 'skipped')}")
            continue
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
        acc = f"{r['accept_len']:.3f}" if "accept_len" in r else r.get("accept_error", "-")[:40]
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else "-"
        pad = f"{100 * r['padding_waste']:.0f}%" if r.get("padding_waste") is not None else "-"
        cpu = r.get("samples_per_cpu_s")
        cpu_ratio = (
            f"{cpu / base['samples_per_cpu_s']:.2f}x"
            if cpu and base and base.get("samples_per_cpu_s")
            else "-"
        )
        cpu_txt = f"{cpu:.2f}" if cpu else "-"
        lines.append(
            f"  {r['run']:26s} {r['samples_per_s']:9.2f} {ratio:>11s} {cpu_txt:>13s} {cpu_ratio:>6s} "
            f"{r['peak_mb']:8.0f} {first:>12s} {pad:>8s} {acc:>10s}"
        )
    lines.append(
        "peak MB: process peak RSS on CPU (target, libraries and interpreter included), torch's peak allocated "
        "bytes on CUDA; samples/CPU-s: samples per CPU second of the training process over the same steps "
        "(one thread: not skewed by other jobs taking the cores; not meaningful on CUDA); padding: share of padded token slots (ours: expected over random batches). Same padding "
        "rule in every run (the batch's longest row; modelopt's cached TTT masks cleared per step) except "
        "'pad N': every batch padded to "
        "data.max_length, as Model-Optimizer's example collator does. modelopt's export aux ids mapped from "
        "eagle_config (0-based layer outputs) to vLLM ids (+1)"
    )
    ours = next((r for r in rows if r["run"] == "ours" and "samples_per_s" in r), None)
    speed = ours["samples_per_s"] / base["samples_per_s"] if ours and base else float("nan")
    lines.append(f"speedup vs nvidia-modelopt eager: {speed:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table."""
    args = parse_args(argv)
    steps = args.steps or (8 if args.quick else 40)
    warmup = args.warmup or (2 if args.quick else 3)
    prompts = args.prompts or (4 if args.quick else 16)
    rounds = args.rounds or (1 if args.quick else 2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vs-modelopt-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = args.python or str(ensure_venv())
    log(f"preparing the tiny target and data in {work} ...")
    setup = prepare(work, args.ttt_steps)
    want_compile = not (args.quick or args.no_compile)
    ovr = list(args.overrides)
    max_len = setup["recipe"].data.max_length
    # (row, kind, folder, compile, fixed-length padding, rounds)
    runs = [
        ("ours", "ours", "ours", False, False, rounds),
        ("modelopt eager", "mo", "mo-eager", False, False, rounds),
    ]
    if not args.quick:
        runs.append((f"modelopt eager, pad {max_len}", "mo", "mo-eager-fixed", False, True, 1))
    if want_compile:
        runs += [("ours compiled", "ours", "ours-compiled", True, False, 1),
                 # its compiled TTT graph (fullgraph) hits the recompile limit when batch widths vary: fixed
                 # width, as its example runs it
                 (f"modelopt compiled, pad {max_len}", "mo", "mo-compiled-fixed", True, True, 1)]  # fmt: skip
    best: dict[str, dict] = {}
    errors: dict[str, str] = {}
    # Rounds alternate the trainers, and each row keeps its best round: on a shared machine other jobs
    # slow a run down, never speed it up.
    for rnd in range(max(r[5] for r in runs)):
        for name, kind, folder, comp, fixed, n in runs:
            if rnd >= n or name in errors:
                continue
            tag = f"{folder}-r{rnd}"
            log(f"training: {name}, round {rnd + 1}/{n} ({warmup} + {steps} steps) ...")
            try:
                if kind == "ours":
                    fig = run_ours(
                        work,
                        tag,
                        setup,
                        args,
                        steps,
                        warmup,
                        [*ovr, *(["training.compile=true"] if comp else [])],
                    )
                else:
                    fig = run_modelopt(work, tag, setup, args, py, steps, warmup, comp, fixed)
            except RuntimeError as e:
                errors[name] = str(e)[:300]
                log(f"{name}: {e}")
                continue
            log(f"{name}: {fig['samples_per_s']:.2f} samples/s")
            if name not in best or fig["samples_per_s"] > best[name]["samples_per_s"]:
                best[name] = {**fig, "rounds": n}
    rows = []
    for name, *_ in runs:
        if name in errors and name not in best:
            rows.append({"run": name, "error": errors[name]})
            continue
        fig = best[name]
        log(f"acceptance of {name} ({prompts} prompts) ...")
        acc = acceptance(
            work, name.replace(" ", "-").replace(",", ""), setup, fig.get("draft"), prompts, args
        )
        if "accept_len" in acc:
            fig["accept_len"] = acc["accept_len"]
        else:
            fig["accept_error"] = acc["error"]
        rows.append({"run": name, **fig})
    meta = {
        "batch_size": args.batch_size,
        "max_length": setup["recipe"].data.max_length,
        "ttt_steps": args.ttt_steps,
        "vocab": setup["vocab"],
        "dtype": "bf16" if args.device == "cuda" else "fp32",
        "device": args.device,
        "threads": args.threads,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
    }
    table = format_table(rows, meta)
    print(table)
    if args.json:
        from modelopt_ext.util.fileio import write_json_atomic

        write_json_atomic(Path(args.json), {"meta": meta, "rows": rows})
    return 0 if all("samples_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
