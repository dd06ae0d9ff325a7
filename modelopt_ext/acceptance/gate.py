"""The acceptance chain of a drafter job, side by side, and the gate on it.

A drafter's acceptance length is measured at three layers, each closer to how it will be served:
  1. the trainer's simulation (`sim` from the per-step accuracies in `metrics.jsonl`, training data);
  2. `specdec_bench`: the training checkpoint in our reference decoder, on the benchmark prompts;
  3. the serving engine (vLLM, SGLang) running the EXPORTED folder on the same prompts and chain length.
Layer 3 is what users get. Export details (aux layer numbering, the draft-to-target vocabulary map, RoPE
settings, weight names an engine silently skips) break a drafter without any error, and then only the
engine's figure drops. The gate fails when an engine's figure is more than `threshold` (relative) below
specdec_bench's, with one line naming the layer that disagrees and what usually causes it. A large drop
from layer 1 to layer 2 is reported as a note (benchmark prompts may differ from training data, so it is not
a failure by itself).

Inputs are the JSON records the measurements write: specdec_bench's `--out`, and one engine record each
(`vllm_acceptance --json`, or `{"engine": "sglang", "skipped": "why"}`, or `{"engine": .., "error": ..}`
when the engine could not run the export).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_THRESHOLD = 0.10
ENGINE_NAMES = {"vllm": "vLLM", "sglang": "SGLang"}

EXPORT_CAUSES = (
    "usual causes: aux hidden-state layer ids off by one (eagle_aux_hidden_state_layer_ids, engine numbering), "
    "a wrong or missing d2t draft-to-target vocabulary map, RoPE settings (rope_theta / rope_scaling) that "
    "differ from training, or weights the engine silently skips (names it does not know)"
)
TRAINING_CAUSES = (
    "usual causes: benchmark prompts unlike the training data, too few training steps for the later chain "
    "positions, or a train/inference mismatch in token shift or RoPE positions"
)


@dataclass(frozen=True)
class Verdict:
    """One gate decision: `ok` False fails the benchmark task; `line` says why either way."""

    ok: bool
    line: str


def simulated_acceptance(metrics: dict, k: int) -> tuple[float, int] | None:
    """1 + sum_j prod_{i<=j} acc_i over the first k chain positions of a trainer record (the greedy-chain
    expectation from per-step accuracies), and how many positions the record had; None without acc_0.

    When the record covers exactly k positions, the drafter's own simulation (`sim_accept_len`) is used:
    for a chain drafter it is the same number, and a block drafter (DFlash) counts each block's leading
    correct drafts, which per-position accuracies alone cannot give."""
    accs = []
    while f"acc_{len(accs)}" in metrics and len(accs) < k:
        accs.append(float(metrics[f"acc_{len(accs)}"]))
    if not accs:
        return None
    if len(accs) == k and f"acc_{k}" not in metrics and isinstance(metrics.get("sim_accept_len"), (int, float)):
        return float(metrics["sim_accept_len"]), k
    total, prod = 1.0, 1.0
    for a in accs:
        prod *= a
        total += prod
    return total, len(accs)


def engine_label(rec: dict) -> str:
    """`vLLM 0.32.0 cpu` / `SGLang`: the engine as a summary line names it."""
    name = ENGINE_NAMES.get(str(rec.get("engine")), str(rec.get("engine")))
    return " ".join(str(x) for x in (name, rec.get("engine_version"), rec.get("engine_build")) if x)


def _detail(rec: dict, prompts_key: str = "num_prompts") -> str:
    return f"{rec.get(prompts_key)} prompts, k={rec.get('num_steps')}"


def _sampled_suffix(s: dict) -> str:
    return f"T={s.get('temperature'):g}, top-p={s.get('top_p'):g}"


def acceptance_lines(trainer: dict | None, bench: dict | None, engines: list[dict]) -> list[str]:
    """One summary line per layer of the chain (and per sampled measurement), each naming its source;
    `trainer` None leaves the trainer's line out, {} says it has no accuracies."""
    lines = []
    k = (bench or {}).get("num_steps") or next((e.get("num_steps") for e in engines if e.get("num_steps")), 3)
    sim = simulated_acceptance(trainer or {}, k)
    if trainer is None:
        pass  # not asked for (an engine record alone)
    elif sim is not None:
        value, n = sim
        note = "" if n == k else f" (only {n} TTT steps recorded)"
        lines.append(
            f"acceptance length (trainer simulation, step {trainer.get('step')}, training data, k={k}): "
            f"{value:.2f}{note}"
        )
    else:
        lines.append("acceptance length (trainer simulation): no per-step accuracies in metrics.jsonl")
    if bench:
        src = bench.get("prompt_set") or f"{bench.get('num_prompts')} prompts"
        lines.append(
            f"acceptance length (specdec_bench, {src}, k={bench.get('num_steps')}): "
            f"{bench['mean_acceptance_length']:.2f}"
        )
        if bench.get("sampled"):
            s = bench["sampled"]
            lines.append(
                f"acceptance length (specdec_bench, {_sampled_suffix(s)}, k={s.get('num_steps')}): "
                f"{s['mean_acceptance_length']:.2f}"
            )
        if "repeated_4gram_fraction" in bench:
            lines.append(
                f"repeated 4-grams in the greedy output (high values inflate acceptance): "
                f"{100 * bench['repeated_4gram_fraction']:.1f}%"
            )
    for rec in engines:
        label = engine_label(rec)
        if rec.get("skipped"):
            lines.append(f"acceptance length ({label}): skipped: {rec['skipped']}")
        elif rec.get("error"):
            lines.append(f"acceptance length ({label}): FAILED to run the export: {rec['error']}")
        elif rec.get("mean_acceptance_length") is None:
            lines.append(f"acceptance length ({label}, {_detail(rec)}): no drafts were made")
        else:
            lines.append(f"acceptance length ({label}, {_detail(rec)}): {rec['mean_acceptance_length']:.2f}")
            s = rec.get("sampled")
            if s and s.get("mean_acceptance_length") is not None:
                lines.append(
                    f"acceptance length ({label}, {_sampled_suffix(s)}, {_detail(rec)}): "
                    f"{s['mean_acceptance_length']:.2f}"
                )
    return lines


def _sampled_note(label: str, ref: dict | None, eng: dict | None, threshold: float) -> str | None:
    """A note (never a failure) when the engine's sampled acceptance is far below the reference's while
    greedy agrees: then the export is fine and the engine's own sampled verification is what differs."""
    if not ref or not eng or eng.get("mean_acceptance_length") is None:
        return None
    if (ref.get("temperature"), ref.get("top_p")) != (eng.get("temperature"), eng.get("top_p")):
        return None
    r, e = float(ref["mean_acceptance_length"]), float(eng["mean_acceptance_length"])
    if r <= 0 or (r - e) / r <= threshold:
        return None
    return (
        f"note: at {_sampled_suffix(eng)} {label} {e:.2f} vs specdec_bench {r:.2f} ({-100 * (r - e) / r:+.0f}%) "
        "while greedy agrees: the export is fine, the engine's sampled verification differs from the reference "
        "rejection sampler (seen with vLLM 0.32.0's CPU build, docs/vllm.md)"
    )


def gate(
    trainer: dict | None, bench: dict | None, engines: list[dict], threshold: float = DEFAULT_THRESHOLD
) -> list[Verdict]:
    """The decisions (see the module docstring); any `ok=False` fails the task."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"gate threshold must be in [0, 1), got {threshold}")
    if not bench:
        return [Verdict(False, "gate FAILED: no specdec_bench result to compare the serving engines with")]
    ref = float(bench["mean_acceptance_length"])
    out: list[Verdict] = []
    sim = simulated_acceptance(trainer or {}, int(bench["num_steps"]))
    if sim is not None and sim[0] > 0 and (sim[0] - ref) / sim[0] > threshold:
        out.append(
            Verdict(
                True,
                f"note: specdec_bench {ref:.2f} is {100 * (sim[0] - ref) / sim[0]:.0f}% below the trainer's "
                f"simulation {sim[0]:.2f}: the reference decoder on the benchmark prompts disagrees with training; "
                + TRAINING_CAUSES,
            )
        )
    measured = 0
    for rec in engines:
        label = engine_label(rec)
        if rec.get("skipped"):
            continue
        if rec.get("error"):
            msg = f"gate FAILED: {label} could not run the exported drafter ({rec['error']}); "
            out.append(Verdict(False, msg + EXPORT_CAUSES))
            continue
        if (rec.get("num_steps"), rec.get("num_prompts")) != (
            bench.get("num_steps"),
            bench.get("num_prompts"),
        ):
            out.append(
                Verdict(
                    False,
                    f"gate FAILED: {label} measured k={rec.get('num_steps')} on {rec.get('num_prompts')} prompts, "
                    f"specdec_bench k={bench.get('num_steps')} on {bench.get('num_prompts')}: not comparable "
                    "(give both the same prompts, --max-prompts and --num-steps)",
                )
            )
            continue
        measured += 1
        eng = float(rec.get("mean_acceptance_length") or 1.0)
        drop = (ref - eng) / ref if ref > 0 else 0.0
        cmp = f"{label} {eng:.2f} vs specdec_bench {ref:.2f} ({-100 * drop:+.0f}%, threshold -{100 * threshold:.0f}%)"
        if drop > threshold:
            out.append(
                Verdict(
                    False,
                    f"gate FAILED: {cmp}: the export as {label.split()[0]} serves it drafts worse than the "
                    f"training checkpoint in our reference decoder; " + EXPORT_CAUSES,
                )
            )
        else:
            out.append(Verdict(True, f"gate passed: {cmp}"))
            note = _sampled_note(label, bench.get("sampled"), rec.get("sampled"), threshold)
            if note:
                out.append(Verdict(True, note))
    if measured == 0 and all(v.ok for v in out):
        out.append(Verdict(True, "gate: no serving engine measured the drafter, nothing to compare"))
    return out
