"""Run the acceptance-length benchmark (`python -m modelopt_ext.specdec_bench` is argument parsing over this):
load the target and the drafter its folder names, check they fit, run the reference decoder greedy (and
sampled, and a chain-length sweep when asked), print the figures, write the JSON record and its plot.
"""

from __future__ import annotations

import sys
from pathlib import Path

from modelopt_ext.util.fileio import write_json_atomic


class BenchInputError(ValueError):
    """A drafter, target or prompt file the benchmark cannot use (one line)."""


def resolve_draft(path: Path) -> Path | None:
    """The drafter folder `--draft` names: itself when it holds a drafter, else (a training output folder)
    its newest complete checkpoint; None when neither."""
    from modelopt_ext.training.checkpoint import find_latest_checkpoint

    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    return find_latest_checkpoint(path) if path.is_dir() else None


def _print_result(label: str, r) -> None:
    per_pos = ", ".join(f"{a:.3f}" for a in r.acceptance_per_position)
    print(f"[{label}] mean acceptance length: {r.mean_acceptance_length:.3f}")
    print(f"[{label}] acceptance per draft position: [{per_pos}]")
    print(f"[{label}] repeated 4-grams in the output: {100 * r.repeated_4gram_fraction:.1f}%")
    print(
        f"[{label}] tokens/s: {r.tokens_per_s_speculative:.1f} with the drafter, {r.tokens_per_s_baseline:.1f} "
        f"without ({r.speedup:.2f}x)"
    )


def _eos_ids(target, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(target, "generation_config", None), tokenizer):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(int(i) for i in v)
    return ids


def run_specdec_bench(
    target_dir: Path,
    draft_dir: Path,
    prompts_file: str | Path,
    *,
    num_steps: int | None = None,
    max_new_tokens: int = 64,
    max_prompts: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    sweep: int = 0,
    ignore_eos: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    out: Path | None = None,
    plot: Path | None = None,
) -> dict:
    """The benchmark record (`outputs_match_greedy` False when speculation ever changed the greedy output);
    `num_steps` None: the drafter's default for this checkpoint or export.
    BenchInputError when the drafter or the prompts do not fit the target."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from modelopt_ext.acceptance.prompts import PromptFileError, prompt_set_name, read_prompts
    from modelopt_ext.acceptance.report import plot_acceptance, sweep_table
    from modelopt_ext.acceptance.specdec import Sampling, run_benchmark, sweep_chain_length
    from modelopt_ext.deploy.export import ExportError, drafter_of
    from modelopt_ext.drafters.hf_folder import read_json
    from modelopt_ext.targets.layers import check_layer_ids, target_num_layers

    hf_logging.disable_progress_bar()  # keep stderr to our own lines
    torch_dtype = getattr(torch, dtype)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch_dtype).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(target_dir)
    except (OSError, ValueError):
        tokenizer = None  # prompts given as input_ids still work
    embeddings = target.get_input_embeddings().weight
    try:
        drafter = drafter_of(draft_dir)
        cfg = read_json(draft_dir / "config.json")
        draft = drafter.load(draft_dir, embeddings)
        prompts = read_prompts(prompts_file, tokenizer, max_prompts)
        check_layer_ids(target_num_layers(target.config), drafter.layer_ids_of(cfg))
        if num_steps is None:
            num_steps = drafter.default_num_steps(cfg)
    except (ExportError, PromptFileError, ValueError) as e:
        raise BenchInputError(f"--draft {draft_dir}: {e}" if not str(e).startswith(str(draft_dir)) else str(e)) from None
    for field, have in (("vocab_size", embeddings.shape[0]), ("target_hidden_size", embeddings.shape[1])):
        if field in cfg and int(cfg[field]) != have:
            raise BenchInputError(f"--draft {draft_dir}: {field} {cfg[field]} != the target's ({have})")
    draft = draft.to(device=device, dtype=torch_dtype)
    eos = set() if ignore_eos else _eos_ids(target, tokenizer)

    proposer = drafter.proposer(draft, target)
    result, _ = run_benchmark(target, proposer, prompts, num_steps, max_new_tokens, eos)
    r = result.to_dict()
    r.update(
        target=str(target_dir),
        draft=str(draft_dir),
        prompts=str(prompts_file),
        prompt_set=prompt_set_name(prompts_file, len(prompts)),
        device=device,
        dtype=dtype,
    )
    print(
        f"prompts: {r['prompt_set']}  draft steps: {result.num_steps}  generated tokens: {result.generated_tokens}"
    )
    _print_result("greedy", result)
    print(f"output identical to target greedy: {result.outputs_match_greedy}")
    if temperature > 0:
        sampling = Sampling(temperature, top_p, seed)
        sampled, _ = run_benchmark(
            target, proposer, prompts, num_steps, max_new_tokens, eos, sampling
        )
        r["sampled"] = sampled.to_dict()
        _print_result(f"T={temperature:g} top-p={top_p:g}", sampled)
    if sweep:
        sweep = sweep_chain_length(
            target, proposer, prompts, sweep, max_new_tokens, eos,
            progress=lambda s: print(f"sweep: k={s.num_steps} done", file=sys.stderr, flush=True),
        )  # fmt: skip
        r["sweep"] = [s.to_dict() for s in sweep]
        print(f"chain-length sweep (greedy, {r['prompt_set']}):")
        print(sweep_table(r["sweep"]))
        if not all(s.outputs_match_greedy for s in sweep):
            r["outputs_match_greedy"] = False
    if out:
        write_json_atomic(Path(out), r)
        print(f"wrote {out}")
    plot = plot or (str(Path(out).with_suffix(".png")) if out else None)
    if plot:
        plot_acceptance(r, plot, title=f"{draft_dir.name} on {target_dir.name}: {r['prompt_set']}")
        print(f"wrote {plot}")
    return r

