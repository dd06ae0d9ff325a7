#!/usr/bin/env bash
# Benchmark task of the examples: the drafter's acceptance length measured three ways, side by side in the
# job summary, and the gate on them (modelopt_ext/acceptance/gate.py decides; this script only runs the steps):
#   1. the trainer's simulated acceptance (OUTPUT/metrics.jsonl, read by the summary);
#   2. specdec_bench: the newest training checkpoint in our reference decoder;
#   3. each serving engine (vLLM; SGLang when installed, else a "skipped" line) running OUTPUT/export.
# The task fails when an engine's figure is more than BENCH_GATE_THRESHOLD below specdec_bench's (one line
# names the layer that disagrees). The summary is printed and kept in OUTPUT/job_summary.txt
# (OUTPUT/summary.txt is the trainer's own training summary).
#
#   bash launcher/node_exec.sh common/eagle3/benchmark.sh TRAIN_OUTPUT_DIR TARGET PROMPTS.jsonl
# Environment: BENCH_PROMPTS (default 8), BENCH_STEPS (draft tokens per round k; default the drafter's: EAGLE-3
#   3, DFlash block size - 1), BENCH_NEW_TOKENS (32),
#   BENCH_ENGINES ("vllm sglang"; "none" measures no engine), BENCH_GATE_THRESHOLD (0.10),
#   BENCH_TEMPERATURE (0: greedy only; > 0 also measures sampled acceptance), BENCH_TOP_P (1.0),
#   BENCH_SWEEP (0; K > 0 adds a chain-length table for k = 1..K), BENCH_ENGINE_TIMEOUT (s per engine, 1200),
#   BENCH_DEVICE (specdec_bench's torch device, cpu), BENCH_DTYPE (float32; bfloat16 for large targets).
# Contract (arguments, knobs, inputs; checked by the launcher before submitting): launcher/contracts.py.
set -euo pipefail

BENCH_REPO="${MODELOPT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
# shellcheck source=common/lib/log.sh
source "${BENCH_REPO}/common/lib/log.sh"
# shellcheck source=common/lib/python.sh
source "${BENCH_REPO}/common/lib/python.sh"

# The options every measurement shares, so that all of them decode the same prompts the same way.
common_args() {
  local target="$1" prompts="$2"
  COMMON=(--target "$target" --prompts "$prompts" --max-prompts "${BENCH_PROMPTS:-8}"
    --max-new-tokens "${BENCH_NEW_TOKENS:-32}"
    --temperature "${BENCH_TEMPERATURE:-0}" --top-p "${BENCH_TOP_P:-1.0}" --dtype "${BENCH_DTYPE:-float32}")
  # Unset: each tool takes the drafter's own draft length (EAGLE-3 3; DFlash its block size - 1).
  if [[ -n "${BENCH_STEPS:-}" ]]; then
    COMMON+=(--num-steps "$BENCH_STEPS")
  fi
}

# measure_engines PY EXPORT SCRATCH: one record per engine in ENGINE_ARGS (an engine that cannot run the
# export writes an error record and exits 1: a finding for the gate, so the loop goes on).
measure_engines() {
  local py="$1" export_dir="$2" scratch="$3" engine record rc
  ENGINE_ARGS=()
  for engine in ${BENCH_ENGINES-vllm sglang}; do
    [[ "$engine" == none ]] && continue
    record="${scratch}/acceptance_${engine}.json"
    log "measuring acceptance in ${engine} (the exported drafter; bounded by ${BENCH_ENGINE_TIMEOUT:-1200} s)"
    rc=0
    "$py" -m modelopt_ext.acceptance.engines --engine "$engine" --draft "$export_dir" "${COMMON[@]}" \
      --timeout "${BENCH_ENGINE_TIMEOUT:-1200}" --work-dir "${scratch}/engine_${engine}" --json "$record" || rc=$?
    [[ "$rc" -le 1 ]] || die "measuring acceptance in ${engine} failed on bad input (exit ${rc})"
    ENGINE_ARGS+=(--engine "$record")
  done
}

main() {
  [[ $# -eq 3 ]] || { echo "usage: benchmark.sh TRAIN_OUTPUT_DIR TARGET PROMPTS.jsonl" >&2; exit 2; }
  local out="$1" target="$2" prompts="$3" py scratch
  py_project "$BENCH_REPO" || die "no Python to run the benchmark with"
  py="$MODELOPT_PYTHON"
  [[ -f "$out/export/config.json" ]] || die "no exported drafter in ${out}/export (did training finish?)"
  scratch="${MODELOPT_SCRATCH:-$out}"
  common_args "$target" "$prompts"
  log "benchmarking the newest checkpoint in ${out} against ${target} (specdec_bench)"
  "$py" -m modelopt_ext.specdec_bench --draft "$out" "${COMMON[@]}" --device "${BENCH_DEVICE:-cpu}" \
    --sweep "${BENCH_SWEEP:-0}" \
    --out "${scratch}/specdec_bench.json"
  measure_engines "$py" "$out/export" "$scratch"
  "$py" -m modelopt_ext.job_summary --output "$out" --target "$target" --bench "${scratch}/specdec_bench.json" \
    "${ENGINE_ARGS[@]}" --gate-threshold "${BENCH_GATE_THRESHOLD:-0.10}" \
    --notes "${scratch}/prepare_notes.txt" --write "$out/job_summary.txt"
}

# On one line with main: bash reads a script as it runs it, so an edit of this file during a long run
# must not be read as the next command.
{ main "$@"; exit $?; }
