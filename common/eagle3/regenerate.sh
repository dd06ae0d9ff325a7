#!/usr/bin/env bash
# Regeneration task: the target answers the conversations' user turns itself (a vLLM OpenAI server on this
# node), so the drafter later trains on the target's own distribution (docs/offline.md#regeneration).
#
#   bash launcher/node_exec.sh common/eagle3/regenerate.sh DATA.jsonl OUT.jsonl TARGET [regenerate options]
#
# Options after TARGET go to `python -m modelopt_ext.regenerate` (--temperature, --top-p, --max-tokens,
# --concurrency, --thinking ...). REGEN_SERVERS (comma-separated URLs of running OpenAI-compatible servers)
# skips starting one here. Knobs: REGEN_PORT (8766), REGEN_MAX_MODEL_LEN (2048), REGEN_DTYPE (auto),
# REGEN_START_TIMEOUT_S (900), REGEN_TP (vLLM tensor-parallel size, 1), SERVER_STOP_GRACE_S (15). On several
# nodes (srun, one task per node) every node serves the target and regenerates its share of the parts; the last
# node to finish assembles OUT.
set -euo pipefail

REGEN_REPO="${MODELOPT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
# shellcheck source=common/lib/log.sh
source "${REGEN_REPO}/common/lib/log.sh"
# shellcheck source=common/lib/python.sh
source "${REGEN_REPO}/common/lib/python.sh"
# shellcheck source=common/lib/rendezvous.sh
source "${REGEN_REPO}/common/lib/rendezvous.sh"
# shellcheck source=common/lib/proc.sh
source "${REGEN_REPO}/common/lib/proc.sh"

SERVER_PID=""

# shellcheck disable=SC2329 # invoked by the EXIT trap set in main
on_exit() {
  local rc=$?
  trap - EXIT
  [[ -n "$SERVER_PID" ]] && proc_stop_group "$SERVER_PID" "${SERVER_STOP_GRACE_S:-15}"
  exit "$rc"
}

# start_server TARGET LOGFILE: a vLLM OpenAI-compatible server for TARGET on this node; sets SERVER_URL.
start_server() {
  local target="$1" logfile="$2" vllm_py flavor port
  vllm_py="$("$PY" -m modelopt_ext.deploy.vllm_env)" || die "vLLM's environment is not available"
  flavor="$("$PY" -c 'from modelopt_ext.deploy.vllm_env import detect_flavor; print(detect_flavor())')"
  port="${REGEN_PORT:-8766}"
  proc_port_free "$port" || port="$(proc_free_port)"
  local -a cmd=("$vllm_py" -m vllm.entrypoints.openai.api_server --model "$target" --host 127.0.0.1
    --port "$port" --max-model-len "${REGEN_MAX_MODEL_LEN:-2048}" --dtype "${REGEN_DTYPE:-auto}"
    --tensor-parallel-size "${REGEN_TP:-1}")
  if [[ "$flavor" == cpu ]]; then
    cmd+=(--enforce-eager)
    export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
  fi
  log "starting vLLM (${flavor}) for ${target} on port ${port} (log ${logfile})"
  proc_start_group "$logfile" "${cmd[@]}"
  SERVER_PID="$PROC_PID"
  SERVER_URL="http://127.0.0.1:${port}"
  if ! proc_wait_healthy "$SERVER_PID" "${SERVER_URL}/health" "${REGEN_START_TIMEOUT_S:-900}" "vLLM"; then
    proc_alive "$SERVER_PID" || SERVER_PID=""
    tail -n 20 "$logfile" >&2 || true
    die "${PROC_WAIT_ERR} (log ${logfile})"
  fi
  log "vLLM ready at ${SERVER_URL}"
}

main() {
  (($# >= 3)) || { echo "usage: regenerate.sh DATA.jsonl OUT.jsonl TARGET [regenerate options]" >&2; exit 2; }
  local data="$1" out="$2" target="$3"
  shift 3
  trap on_exit EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT
  py_project "$REGEN_REPO" || die "no Python to run the project with on $(hostname)"
  PY="$MODELOPT_PYTHON"
  local servers="${REGEN_SERVERS:-}"
  if [[ -z "$servers" ]]; then
    mkdir -p "$(dirname "$out")"
    start_server "$target" "${out}.vllm.log"
    servers="$SERVER_URL"
  fi
  # One server per node; the nodes share the parts of the file (Slurm: one task per node).
  "$PY" -m modelopt_ext.regenerate --data "$data" --out "$out" --servers "$servers" \
    --rank "${SLURM_NODEID:-0}" --world-size "${SLURM_NNODES:-1}" "$@"
}

# On one line with main: bash reads a script as it runs it, so an edit of this file during a long run
# must not be read as the next command.
{ main "$@"; exit $?; }
