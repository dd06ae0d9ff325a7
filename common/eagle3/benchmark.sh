#!/usr/bin/env bash
# Benchmark task of the examples: check the exported drafter, measure its acceptance length with
# specdec_bench, print the job summary (modelopt_ext.job_summary) and keep it in OUTPUT/job_summary.txt
# (OUTPUT/summary.txt is the trainer's own training summary).
#
#   bash launcher/node_exec.sh common/eagle3/benchmark.sh TRAIN_OUTPUT_DIR TARGET PROMPTS.jsonl
# Environment: BENCH_PROMPTS (default 8), BENCH_STEPS (draft tokens per round, 3), BENCH_NEW_TOKENS (32).
# Contract (arguments, knobs, inputs; checked by the launcher before submitting): launcher/contracts.py.
set -euo pipefail

BENCH_REPO="${MODELOPT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
# shellcheck source=common/lib/log.sh
source "${BENCH_REPO}/common/lib/log.sh"
# shellcheck source=common/lib/python.sh
source "${BENCH_REPO}/common/lib/python.sh"

main() {
  [[ $# -eq 3 ]] || { echo "usage: benchmark.sh TRAIN_OUTPUT_DIR TARGET PROMPTS.jsonl" >&2; exit 2; }
  local out="$1" target="$2" prompts="$3" py bench
  py_project "$BENCH_REPO" || die "no Python to run the benchmark with"
  py="$MODELOPT_PYTHON"
  [[ -f "$out/export/config.json" ]] || die "no exported drafter in ${out}/export (did training finish?)"
  bench="${MODELOPT_SCRATCH:-$out}/specdec_bench.json"
  log "benchmarking the drafter ${out}/export against ${target}"
  "$py" -m modelopt_ext.specdec_bench --target "$target" --draft "$out/export" --prompts "$prompts" \
    --max-prompts "${BENCH_PROMPTS:-8}" --num-steps "${BENCH_STEPS:-3}" --max-new-tokens "${BENCH_NEW_TOKENS:-32}" \
    --out "$bench"
  "$py" -m modelopt_ext.job_summary --output "$out" --target "$target" --bench "$bench" \
    --notes "${MODELOPT_SCRATCH:-$out}/prepare_notes.txt" --write "$out/job_summary.txt"
}

# On one line with main: bash reads a script as it runs it, so an edit of this file during a long run
# must not be read as the next command.
{ main "$@"; exit $?; }
