#!/usr/bin/env bash
# Data task of the local examples: the tiny target, its conversations and (optionally) vLLM's environment,
# each reused when already there. Writes what it built or reused to $MODELOPT_SCRATCH/prepare_notes.txt
# (the job summary prints it).
#
#   bash launcher/node_exec.sh common/eagle3/prepare_tiny.sh [TINY_DIR]     (default outputs/tiny)
# Environment: PREPARE_VLLM_ENV=1 also builds (or reuses) vLLM's own venv, so the serve task starts at once.
# Contract (arguments, knobs, what it writes; checked by the launcher before submitting): launcher/contracts.py.
set -euo pipefail

PREP_REPO="${MODELOPT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
# shellcheck source=common/lib/log.sh
source "${PREP_REPO}/common/lib/log.sh"
# shellcheck source=common/lib/python.sh
source "${PREP_REPO}/common/lib/python.sh"

# note LINE: log LINE and keep it for the summary.
note() {
  log "$*"
  printf '%s\n' "$*" >>"$NOTES"
}

# prepare_target DIR: build the tiny target and conversations, or say they were reused.
prepare_target() {
  local dir="$1" t0=$SECONDS
  if [[ -f "$dir/target/config.json" && -s "$dir/conversations.jsonl" ]]; then
    "$PY" -m modelopt_ext.tiny --out "$dir/target" >&2
    note "reused: tiny target ${dir}/target and conversations ${dir}/conversations.jsonl"
  else
    "$PY" -m modelopt_ext.tiny --out "$dir/target" --data "$dir/conversations.jsonl" >&2
    note "built: tiny target ${dir}/target and conversations in $((SECONDS - t0))s"
  fi
  if compgen -G "$dir/cache/tokenized-*" >/dev/null; then
    note "reused: tokenisation cache ${dir}/cache"
  else
    note "tokenisation: none cached yet in ${dir}/cache (the trainer builds it once)"
  fi
}

# prepare_vllm: build (or reuse) vLLM's own environment.
prepare_vllm() {
  local t0=$SECONDS marker="${MODELOPT_EXT_VLLM_ENV:-${PREP_REPO}/.venv-vllm}/modelopt_ext_vllm_env.json" had=0
  [[ -f "$marker" ]] && had=1
  "$PY" -m modelopt_ext.deploy.vllm_env >&2
  if ((had)); then
    note "reused: vLLM environment $(dirname "$marker")"
  else
    note "built: vLLM environment $(dirname "$marker") in $((SECONDS - t0))s"
  fi
}

main() {
  local dir="${1:-outputs/tiny}"
  py_project "$PREP_REPO" || die "no Python to prepare the tiny target with"
  PY="$MODELOPT_PYTHON"
  NOTES="${MODELOPT_SCRATCH:?the launcher sets MODELOPT_SCRATCH}/prepare_notes.txt"
  : >"$NOTES"
  prepare_target "$dir"
  if [[ "${PREPARE_VLLM_ENV:-0}" == 1 ]]; then
    prepare_vllm
  fi
}

# On one line with main: bash reads a script as it runs it, so an edit of this file during a long run
# must not be read as the next command.
{ main "$@"; exit $?; }
