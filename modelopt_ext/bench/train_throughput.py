"""Training throughput of the drafter trainer on this machine: `python -m modelopt_ext.bench.train_throughput`.

Runs the real trainer (colocated tiny target, the recipe's drafter and objective: EAGLE-3 by default,
`--recipe recipes/dflash/tiny.yaml` for DFlash) for `--warmup + --steps` optimizer
steps of a recipe (default: recipes/eagle3/tiny.yaml, building its tiny target and conversations when
missing) in a scratch output folder, and reports steady-state samples/s and tokens/s (non-padding tokens)
measured over the steps after the warmup, from the trainer's own metrics.jsonl. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "eagle3" / "tiny.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.bench.train_throughput", description=__doc__.splitlines()[0]
    )
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="Recipe YAML (default: the tiny recipe).")
    p.add_argument("--steps", type=int, default=20, help="Measured optimizer steps (after the warmup).")
    p.add_argument("--warmup", type=int, default=3, help="Unmeasured first steps (allocations, caches).")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: tiny models gain nothing from more, and on a shared machine "
        "spinning OpenMP threads cost ~10x; 0 = torch's default).",
    )
    p.add_argument("--workdir", default=None, help="Scratch output folder (default: a temporary one).")
    p.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    p.add_argument("overrides", nargs="*", help="Dotted recipe overrides, e.g. training.batch_size=4.")
    return p.parse_args(argv)


def ensure_tiny_inputs(recipe) -> None:
    """Build the recipe's tiny target and conversations if they are missing (the tiny recipe only)."""
    from modelopt_ext.targets.tiny import build_tiny_target, write_tiny_conversations

    if not (Path(recipe.model.path) / "config.json").is_file():
        build_tiny_target(recipe.model.path)
    if not Path(recipe.data.path).is_file():
        write_tiny_conversations(recipe.data.path, 2000, seed=1)


def steady_rates(metrics_file: Path, warmup: int) -> dict[str, float]:
    """samples/s and tokens/s between the end of step `warmup` and the last step (per-step log records)."""
    recs = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    first = next(r for r in recs if r["step"] == warmup)
    last = recs[-1]
    dt = last["elapsed_s"] - first["elapsed_s"]
    return {
        "steps": last["step"] - first["step"],
        "seconds": dt,
        "samples_per_s": (last["run_samples"] - first["run_samples"]) / dt,
        "tokens_per_s": (last["run_tokens"] - first["run_tokens"]) / dt,
        "samples_per_cpu_s": (last["run_samples"] - first["run_samples"])
        / max(1e-9, last.get("process_cpu_s", 0.0) - first.get("process_cpu_s", 0.0)),
        "final_loss": last.get("loss"),
        "final_sim_accept_len": last.get("sim_accept_len"),
    }


def peak_memory() -> dict:
    """{peak_mb, peak_kind}: torch's peak allocated CUDA bytes, else the process's peak RSS (CPU: includes
    the interpreter, the libraries and a colocated target)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "peak_kind": "cuda allocated"}
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_kind": "process RSS"}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    args = parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        print("error: --steps and --warmup must be >= 1", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not args.workdir:
        # Every rank must write into the same output folder (checkpoints are collective).
        print("error: under accelerate launch, pass --workdir (a folder every rank sees)", file=sys.stderr)
        return 2
    import torch

    from modelopt_ext.config.recipe import load_recipe
    from modelopt_ext.training.trainer import train
    from modelopt_ext.util.errors import ConfigError, exit_with

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="train-throughput-"))
    total = args.warmup + args.steps
    overrides = [
        *args.overrides,
        f"training.output_dir={work / 'out'}",
        f"training.max_steps={total}",
        "training.log_interval=1",
        f"training.save_interval={total}",
        "training.export_at_end=false",
    ]
    try:
        recipe = load_recipe(args.recipe, overrides)
    except ConfigError as e:
        exit_with(e)
    if world == 1 and Path(args.recipe).resolve() == DEFAULT_RECIPE:
        ensure_tiny_inputs(recipe)
    elif not (Path(recipe.model.path) / "config.json").is_file():
        # Ranks must not race to build it: build once, then launch.
        print(
            f"error: {recipe.model.path}: no target (python -m modelopt_ext.tiny builds the tiny one)",
            file=sys.stderr,
        )
        return 2
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(recipe)
    if os.environ.get("RANK", "0") != "0":
        return 0
    figures = steady_rates(Path(recipe.training.output_dir) / "metrics.jsonl", args.warmup)
    figures.update(peak_memory())
    figures.update(
        device=str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        torch_threads=torch.get_num_threads(),
        batch_size=recipe.training.batch_size,
        grad_accum=recipe.training.grad_accum,
        drafter=recipe.drafter,
        drafter_settings=recipe.drafter_settings.model_dump(mode="json"),
        world_size=world,
    )
    print(
        f"train_throughput: {figures['samples_per_s']:.2f} samples/s, {figures['tokens_per_s']:.0f} tokens/s "
        f"over {figures['steps']} steps ({figures['seconds']:.1f} s) after {args.warmup} warmup steps, "
        f"peak {figures['peak_mb']:.0f} MB ({figures['peak_kind']}); "
        f"batch {figures['batch_size']} x accum {figures['grad_accum']}, drafter {recipe.drafter} "
        f"({', '.join(f'{k} {v}' for k, v in figures['drafter_settings'].items() if v is not None)}), "
        f"{figures['device']}, {world} rank(s) x {figures['torch_threads']} torch thread(s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
