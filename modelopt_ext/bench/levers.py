"""Before/after of the trainer's speed levers on the same batches: `python -m modelopt_ext.bench.levers`.

Builds the tiny recipe's training parts once (colocated target, full draft vocabulary by default) and times
whole optimizer steps (target forward, TTT loss, backward, AdamW) on the same fixed batches for each
variant, by the process's CPU time (one thread), the variants interleaved over `--rounds` (best round kept):

    baseline        dense TTT attention, logits at every position (the trainer before memory-linear TTT attention)
    +attention      memory-linear TTT attention (eagle.attention=auto)
    +sel. logits    and draft logits only at each step's valid positions (the trainer now)

A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.bench.levers", description=__doc__.splitlines()[0]
    )
    p.add_argument("--steps", type=int, default=10, help="Timed optimizer steps per variant and round.")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="Recipe overrides (default: eagle.draft_vocab_size=100000).")
    return p.parse_args(argv)


VARIANTS = {
    "baseline": {"attention_impl": "dense", "selects_logits": False},
    "+attention": {"attention_impl": "auto", "selects_logits": False},
    "+sel. logits": {"attention_impl": "auto", "selects_logits": True},
}


def main(argv: list[str] | None = None) -> int:
    """Time every variant and print samples/s and the ratio to the baseline."""
    args = parse_args(argv)
    import tempfile

    import torch

    from modelopt_ext.bench.train_throughput import DEFAULT_RECIPE, ensure_tiny_inputs
    from modelopt_ext.config.recipe import load_recipe
    from modelopt_ext.training.distributed import init_distributed
    from modelopt_ext.training.parts import build_parts

    torch.set_num_threads(args.threads)
    overrides = args.overrides or ["eagle.draft_vocab_size=100000"]
    recipe = load_recipe(str(DEFAULT_RECIPE), [*overrides, f"training.output_dir={tempfile.mkdtemp()}"])
    ensure_tiny_inputs(recipe)
    parts = build_parts(recipe, init_distributed(), None)
    bs = recipe.training.batch_size
    batches = [
        parts.collate([parts.dataset[i] for i in range(k * bs, (k + 1) * bs)]) for k in range(args.steps)
    ]
    sups = [parts.source(b) for b in batches]  # the target's forward is the same for every variant
    model = parts.model
    missing = sorted({k for variant in VARIANTS.values() for k in variant if not hasattr(model, k)})
    if missing:
        sys.exit(f"levers: error: the {recipe.drafter} drafter's model has no {', '.join(missing)} to switch")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)

    def run(variant: dict) -> float:
        for k, v in variant.items():
            setattr(model, k, v)
        t0 = time.process_time()  # one thread: CPU time is not skewed by other jobs taking the cores
        for sup in sups:
            loss, _ = parts.loss_fn(model, sup, parts.vocab, parts.head)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return len(sups) * bs / (time.process_time() - t0)

    best = dict.fromkeys(VARIANTS, 0.0)
    run(VARIANTS["baseline"])  # warm-up
    for _ in range(args.rounds):
        for name, variant in VARIANTS.items():
            best[name] = max(best[name], run(variant))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    settings = ", ".join(f"{k} {v}" for k, v in recipe.drafter_settings.model_dump().items() if v is not None)
    print(
        f"levers: tiny target, {' '.join(overrides)}, batch {bs} (~{tokens:.0f} real tokens), "
        f"drafter {recipe.drafter} ({settings}), "
        f"{args.steps} steps x best of {args.rounds} rounds, {args.threads} thread(s); draft step only "
        f"(the target's forward is computed once, outside the timing)"
    )
    for name in VARIANTS:
        print(f"  {name:14s} {best[name]:8.2f} samples per CPU-s  {best[name] / best['baseline']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
