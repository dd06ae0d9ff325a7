#!/usr/bin/env bash
# Streaming drafter training on one or many nodes (any drafter: the recipe's `drafter:` decides; the file keeps the
# reference launcher's name): hidden-state servers + trainers meeting through shared storage.
#
#   bash launcher/node_exec.sh common/eagle3/train_eagle_streaming.sh --config RECIPE.yaml [overrides] [--resume auto]
#
# The arguments are those of `python -m modelopt_ext.train`. Runs once per node (srun, one task per node).
# The node's role comes from the launcher's plan (SERVE_NODE_IDS, TRAIN_NODE_IDS, TRAINER_SERVER_MAP and
# SLURM_NODEID; never recomputed here). One node that both serves and trains runs the server and the
# trainer side by side. Files in $MODELOPT_SCRATCH/rendezvous/<job id>/:
#   server.<id>         the URL of serve node <id>, published atomically once it answers its health check
#   server.<id>.pid     its server's pid (fault tests kill it); trainer.<id>.pid likewise
#   server.<id>.restarts  how often serve node <id> restarted its server; server.<id>.down: it gave it up
#   trainer_addr        the head trainer's ip:port for accelerate's rendezvous
#   done | failed       the ending: done by the head trainer after the export; failed by ANY node (trap),
#                       with the reason. Servers exit on either; trainers stop on failed.
#   logs/               the servers' and trainers' own logs
# Arguments and knobs are declared in launcher/contracts.py (the launcher checks every task against it at
# --dryrun and submit; SERVE_NODES is read by the launcher's role plan). Knobs (environment;
# docs/entry-scripts.md): SERVE_ENGINE, SERVE_PORT, SERVE_TP, SERVE_GPU_MEM_UTIL,
# EAGLE_CAPTURE_IDS, STREAMING_NUM_WORKERS, SERVE_MAX_MODEL_LEN, SERVE_MAX_NUM_SEQS, SERVE_ADVERTISE_IP,
# MAIN_PROCESS_PORT, TRAIN_PROCS_PER_NODE, SERVE_RESTARTS, SERVE_RESTART_BACKOFF_S, and the timeouts
# SERVE_START_TIMEOUT_S, SERVE_WAIT_S, HEALTH_WAIT_S, TRAINER_WAIT_S, DONE_WAIT_S; TRAIN_ENTRY (the module the
# trainer ranks run: modelopt_ext.train, or modelopt_ext.dump to write the servers' supervision to
# <training.output_dir>/supervision, docs/offline.md).
set -euo pipefail

ENTRY_REPO="${MODELOPT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
# shellcheck source=common/lib/log.sh
source "${ENTRY_REPO}/common/lib/log.sh"
# shellcheck source=common/lib/python.sh
source "${ENTRY_REPO}/common/lib/python.sh"
# shellcheck source=common/lib/rendezvous.sh
source "${ENTRY_REPO}/common/lib/rendezvous.sh"
# shellcheck source=common/lib/plan.sh
source "${ENTRY_REPO}/common/lib/plan.sh"
# shellcheck source=common/lib/proc.sh
source "${ENTRY_REPO}/common/lib/proc.sh"

SERVE_ENGINE="${SERVE_ENGINE:-vllm}"
TRAIN_ENTRY="${TRAIN_ENTRY:-modelopt_ext.train}"
SERVE_START_TIMEOUT_S="${SERVE_START_TIMEOUT_S:-900}"
SERVE_WAIT_S="${SERVE_WAIT_S:-1200}"
HEALTH_WAIT_S="${HEALTH_WAIT_S:-120}"
TRAINER_WAIT_S="${TRAINER_WAIT_S:-600}"
DONE_WAIT_S="${DONE_WAIT_S:-600}"
# A hidden-state server has nothing to save: a short grace after SIGTERM (vLLM's CPU build can take 30 s+).
SERVER_STOP_GRACE_S="${SERVER_STOP_GRACE_S:-15}"

NODE_ID="${SLURM_NODEID:-0}"
PHASE="starting"
SERVER_PID=""
TRAIN_PID=""
RDV_DIR=""
LAST_ERR=""

# ------------------------------------------------------------------------------------------ endings

# on_err LINE: remember the failing command for the failed marker (the EXIT trap writes it).
# shellcheck disable=SC2329 # invoked by the ERR trap set in main
on_err() {
  LAST_ERR="line $1: ${BASH_COMMAND}"
}

# on_exit: any non-zero exit of this node marks the job failed (first reason wins) and stops our children.
# shellcheck disable=SC2329 # invoked by the EXIT trap set in main
on_exit() {
  local rc=$?
  trap - EXIT ERR
  if ((rc != 0)) && [[ -n "$RDV_DIR" ]]; then
    rdv_mark_failed "$RDV_DIR" "${PHASE} failed (exit ${rc})${LAST_ERR:+: ${LAST_ERR}}"
  fi
  [[ -n "$TRAIN_PID" ]] && proc_stop_group "$TRAIN_PID" 20
  stop_server
  if ((rc != 0)) && [[ -n "$RDV_DIR" ]]; then
    log "exiting with ${rc}; job: $(rdv_failure_reason "$RDV_DIR")"
  fi
  exit "$rc"
}

# fail REASON: record REASON as the job's failure and exit non-zero.
fail() {
  [[ -n "$RDV_DIR" ]] && rdv_mark_failed "$RDV_DIR" "$*"
  die "$*"
}

# ------------------------------------------------------------------------------------------ helpers

# gpu_count: visible NVIDIA GPUs (0 without any).
gpu_count() {
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# split_train_args ARGS...: the trainer's options (--config/--resume with their values) into TRAIN_OPTS and
# its dotted overrides into TRAIN_OVERRIDES, so the script's own overrides can follow the user's (argparse
# takes positional overrides only before the first option: `... --resume auto data.x=1` is an error).
split_train_args() {
  TRAIN_OPTS=()
  TRAIN_OVERRIDES=()
  while (($#)); do
    case "$1" in
      --config | --resume)
        (($# >= 2)) || fail "$1 needs a value"
        TRAIN_OPTS+=("$1" "$2")
        shift 2
        ;;
      --config=* | --resume=*)
        TRAIN_OPTS+=("$1")
        shift
        ;;
      *)
        TRAIN_OVERRIDES+=("$1")
        shift
        ;;
    esac
  done
}

# resolve_job ARGS...: the recipe's target, dtype, layers and output folder as JOB_* variables
# (modelopt_ext.job_info resolves and validates them, EAGLE_CAPTURE_IDS included; nothing is checked here).
resolve_job() {
  local info
  local -a capture=()
  [[ -n "${EAGLE_CAPTURE_IDS:-}" ]] && capture=(--capture-ids "$EAGLE_CAPTURE_IDS")
  info="$("$PY" -m modelopt_ext.job_info "${capture[@]}" "$@")" \
    || fail "the recipe, its overrides or EAGLE_CAPTURE_IDS are invalid (see above)"
  eval "$info"
  HS_DIR="${SERVE_SHARED_STORAGE:-${MODELOPT_SCRATCH}/hidden_states/$(rdv_job_key)}"
}

# ------------------------------------------------------------------------------------------ serving

# health_path: the server's health route for the engine.
health_path() {
  case "$SERVE_ENGINE" in
    vllm) echo /v1/models ;;
    target) echo /health ;;
  esac
}

# start_server: start this node's hidden-state server in its own process group (SERVER_PID).
start_server() {
  local ip="$1" port="$2" log_file="$RDV_DIR/logs/server.${NODE_ID}.log"
  local -a cmd
  mkdir -p "$HS_DIR"
  case "$SERVE_ENGINE" in
    vllm)
      cmd=("$PY" -m modelopt_ext.serve_hidden_states --engine vllm --model "$JOB_TARGET"
        --shared-storage "$HS_DIR" --capture-ids "$JOB_CAPTURE_IDS" --host 0.0.0.0 --port "$port"
        --advertise-host "$ip" --dtype "$JOB_DTYPE" --startup-timeout "$SERVE_START_TIMEOUT_S"
        --max-model-len "${SERVE_MAX_MODEL_LEN:-$((JOB_MAX_LENGTH + 64))}"
        --log "$RDV_DIR/logs/vllm.${NODE_ID}.log")
      [[ -n "${SERVE_TP:-}" ]] && cmd+=(--tp "$SERVE_TP")
      [[ -n "${SERVE_MAX_NUM_SEQS:-}" ]] && cmd+=(--max-num-seqs "$SERVE_MAX_NUM_SEQS")
      [[ -n "${SERVE_GPU_MEM_UTIL:-}" ]] && cmd+=(--gpu-memory-utilization "$SERVE_GPU_MEM_UTIL")
      ;;
    target)
      local device=cpu
      (($(gpu_count) > 0)) && device=cuda
      cmd=("$PY" -m modelopt_ext.serve_target --target "$JOB_TARGET" --host 0.0.0.0 --port "$port"
        --aux-layer-ids "$JOB_AUX_IDS" --dtype "$JOB_DTYPE" --device "$device")
      ;;
    *) fail "SERVE_ENGINE='${SERVE_ENGINE}': use vllm or target" ;;
  esac
  log "starting the ${SERVE_ENGINE} hidden-state server on port ${port} (log ${log_file})"
  proc_start_group "$log_file" "${cmd[@]}"
  SERVER_PID="$PROC_PID"
  rdv_publish "$RDV_DIR/server.${NODE_ID}.pid" "$SERVER_PID"
}

# wait_own_server URL: bounded wait (SERVE_START_TIMEOUT_S) until our server answers (proc_wait_healthy).
# Returns 0 once healthy, else non-zero with the reason in WAIT_ERR (the server died: its log's tail is
# shown; the job ended; or the time passed).
wait_own_server() {
  local url="$1" log_file="$RDV_DIR/logs/server.${NODE_ID}.log"
  WAIT_ERR=""
  proc_wait_healthy "$SERVER_PID" "${url}$(health_path)" "$SERVE_START_TIMEOUT_S" \
    "the ${SERVE_ENGINE} server" && return 0
  WAIT_ERR="${PROC_WAIT_ERR} (log ${log_file})"
  if ! proc_alive "$SERVER_PID"; then
    SERVER_PID=""
    tail -n 20 "$log_file" >&2 || true
  fi
  return 1
}

# stop_server: stop this node's server (its whole process group), if one runs.
stop_server() {
  [[ -n "$SERVER_PID" ]] && proc_stop_group "$SERVER_PID" "$SERVER_STOP_GRACE_S"
  SERVER_PID=""
}

# serve: start the server, publish its URL once healthy (the trainers read it from the rendezvous folder).
serve() {
  PHASE="serve node ${NODE_ID}"
  SERVE_IP="$(rdv_advertise_ip)"
  SERVE_PORT_USED="${SERVE_PORT:-8765}"
  if [[ "$SINGLE_NODE" == 1 && -z "${SERVE_PORT:-}" ]] && ! proc_port_free "$SERVE_PORT_USED"; then
    SERVE_PORT_USED="$(proc_free_port)"  # one machine, several jobs: take any free port rather than fail
  fi
  start_server "$SERVE_IP" "$SERVE_PORT_USED"
  wait_own_server "http://127.0.0.1:${SERVE_PORT_USED}" || fail "$WAIT_ERR"
  rdv_publish "$RDV_DIR/server.${NODE_ID}" "http://${SERVE_IP}:${SERVE_PORT_USED}"
  log "server ready: http://${SERVE_IP}:${SERVE_PORT_USED} (pid ${SERVER_PID})"
}

# serve_restarts: how often a dead server is restarted: SERVE_RESTARTS, else 3 when the job has other
# servers to fall back on meanwhile, else 0 (a lone server's death fails the job at once).
serve_restarts() {
  if [[ -n "${SERVE_RESTARTS:-}" ]]; then
    echo "$SERVE_RESTARTS"
  elif (($(plan_count "$SERVE_NODE_IDS") >= 2)); then
    echo 3
  else
    echo 0
  fi
}

# sleep_unless_finished SECONDS: sleep, but return 1 early when the job ends meanwhile.
sleep_unless_finished() {
  local until=$((SECONDS + $1))
  while ((SECONDS < until)); do
    rdv_finished "$RDV_DIR" && return 1
    sleep "${RDV_POLL_S:-1}"
  done
}

# restart_server ATTEMPT MAX: after a backoff (SERVE_RESTART_BACKOFF_S doubled per attempt), start the server
# again on its port and re-publish its address once it answers. Returns non-zero when this attempt failed.
restart_server() {
  local attempt="$1" max="$2" delay started url
  delay=$((${SERVE_RESTART_BACKOFF_S:-2} * (1 << (attempt - 1))))
  log "restart ${attempt}/${max} of the ${SERVE_ENGINE} server on node ${NODE_ID} in ${delay}s"
  sleep_unless_finished "$delay" || return 0
  started=$SECONDS
  start_server "$SERVE_IP" "$SERVE_PORT_USED"
  if ! wait_own_server "http://127.0.0.1:${SERVE_PORT_USED}"; then
    stop_server
    rdv_finished "$RDV_DIR" && return 0  # the job ended meanwhile: nothing left to serve
    log "restart ${attempt}/${max} failed: ${WAIT_ERR}"
    return 1
  fi
  url="http://${SERVE_IP}:${SERVE_PORT_USED}"
  rdv_publish "$RDV_DIR/server.${NODE_ID}" "$url"
  rdv_publish "$RDV_DIR/server.${NODE_ID}.restarts" "$attempt"
  log "server restarted: ${url} healthy again $((SECONDS - started))s after restart ${attempt}/${max} (pid ${SERVER_PID}); address re-published"
}

# all_servers_down: true when every planned serve node has given its server up (server.<id>.down).
all_servers_down() {
  local id
  local -a ids
  IFS=, read -r -a ids <<<"$SERVE_NODE_IDS"
  for id in "${ids[@]}"; do
    [[ -e "$RDV_DIR/server.${id}.down" ]] || return 1
  done
}

# server_lost CODE RESTARTS_DONE: our server exited with CODE. Restart it while attempts are left (each
# logged); returns 0 once it serves again, 1 when this node gave it up (the other servers carry on; the job
# fails at once only when no planned server is left, else through the trainers' data.server_grace_s).
server_lost() {
  local code="$1" done_restarts="$2" max attempt
  max="$(serve_restarts)"
  log "outage: the ${SERVE_ENGINE} hidden-state server on node ${NODE_ID} exited with code ${code} (log $RDV_DIR/logs/server.${NODE_ID}.log)"
  for ((attempt = done_restarts + 1; attempt <= max; attempt++)); do
    RESTARTS_DONE="$attempt"
    rdv_finished "$RDV_DIR" && return 0
    restart_server "$attempt" "$max" && return 0
  done
  rdv_publish "$RDV_DIR/server.${NODE_ID}.down" "exited with code ${code} after ${done_restarts} restart(s) of ${max}"
  if all_servers_down; then
    fail "the ${SERVE_ENGINE} hidden-state server on node ${NODE_ID} exited with code ${code} and no hidden-state server is left (restarts: ${max} per node)"
  fi
  log "the server on node ${NODE_ID} stays down after ${max} restart(s); the job continues on the other servers"
  return 1
}

# serve_until_finished: keep the server up until the job ends (restarting it when it dies, server_lost),
# then stop it: the node exits 0 on done, 1 on failed.
serve_until_finished() {
  RESTARTS_DONE=0
  # The one wait without its own deadline: serving lasts as long as training, which the task's Slurm time
  # limit bounds; any node's failure ends it through the failed marker.
  log "serving until the job's done or failed marker appears in ${RDV_DIR} (bounded by the task's time limit)"
  while :; do
    if [[ -n "$SERVER_PID" ]] && ! proc_alive "$SERVER_PID"; then
      proc_wait_exit "$SERVER_PID"
      SERVER_PID=""
      server_lost "$PROC_RC" "$RESTARTS_DONE" || true
    fi
    if [[ -e "$RDV_DIR/done" ]]; then
      log "job done: stopping the server"
      stop_server
      return 0
    fi
    if rdv_failed "$RDV_DIR"; then
      log "job failed ($(rdv_failure_reason "$RDV_DIR")): stopping the server"
      stop_server
      exit 1
    fi
    sleep "${RDV_POLL_S:-1}"
  done
}

# ------------------------------------------------------------------------------------------ training

# await_servers: bounded wait for every planned server's URL, then a health check of each. SERVER_URLS is
# the servers in this node's preference order from the role plan (TRAINER_SERVER_MAP: its own segment's
# first); where each rank and worker starts in it is decided in Python (supply/server_pool.first_server).
await_servers() {
  local -a ids files
  local id url
  IFS=, read -r -a ids <<<"$SERVE_NODE_IDS"
  for id in "${ids[@]}"; do
    files+=("$RDV_DIR/server.${id}")
  done
  log "waiting (at most ${SERVE_WAIT_S}s) for the hidden-state servers of nodes ${SERVE_NODE_IDS}"
  rdv_wait_files "$SERVE_WAIT_S" "the hidden-state servers of nodes ${SERVE_NODE_IDS}" "${files[@]}" \
    || fail "no address from some hidden-state servers (planned: nodes ${SERVE_NODE_IDS}; see above)"
  SERVER_URLS="$(rdv_ordered_urls "$RDV_DIR" "$(plan_preferred_server)" "${ids[@]}")"
  IFS=, read -r -a urls <<<"$SERVER_URLS"
  for url in "${urls[@]}"; do
    rdv_wait_http "$HEALTH_WAIT_S" "${url}$(health_path)" || fail "hidden-state server ${url} is not healthy"
  done
  log "servers (preferred first): ${SERVER_URLS}"
}

# train_procs: processes per trainer node: TRAIN_PROCS_PER_NODE, else the GPUs left for training, else 1.
train_procs() {
  if [[ -n "${TRAIN_PROCS_PER_NODE:-}" ]]; then
    echo "$TRAIN_PROCS_PER_NODE"
    return
  fi
  local gpus
  gpus="$(gpu_count)"
  if [[ "$SINGLE_NODE" == 1 && "$gpus" -gt 1 ]]; then
    echo $((gpus - ${SERVE_TP:-1}))
  elif ((gpus > 0)); then
    echo "$gpus"
  else
    echo 1
  fi
}

# trainer_rendezvous NUM_MACHINES RANK: the head publishes ip:port for accelerate; the others wait for it.
trainer_rendezvous() {
  local machines="$1" rank="$2" port="${MAIN_PROCESS_PORT:-29500}"
  if ((rank == 0)); then
    if ((machines == 1)) && [[ -z "${MAIN_PROCESS_PORT:-}" ]] && ! proc_port_free "$port"; then
      port="$(proc_free_port)"
    fi
    rdv_publish "$RDV_DIR/trainer_addr" "$(rdv_advertise_ip):${port}"
  else
    rdv_wait_files "$TRAINER_WAIT_S" "the head trainer's address" "$RDV_DIR/trainer_addr" \
      || fail "the head trainer (node $(plan_head_trainer)) never published its address"
  fi
  TRAINER_ADDR="$(rdv_read "$RDV_DIR/trainer_addr")"
}

# train ARGS...: run modelopt_ext.train (under accelerate when there is more than one process) with the
# servers' URLs; stop it when the job fails elsewhere.
train() {
  local machines rank procs total guard=() rc
  PHASE="trainer node ${NODE_ID}"
  await_servers
  machines="$(plan_count "$TRAIN_NODE_IDS")"
  rank="$(plan_trainer_rank)"
  procs="$(train_procs)"
  total=$((machines * procs))
  trainer_rendezvous "$machines" "$rank"

  local -a overrides=("data.server_urls=[${SERVER_URLS}]" "data.shared_storage_root=${HS_DIR}")
  [[ -n "$JOB_LAYER_OVERRIDE" ]] && overrides+=("$JOB_LAYER_OVERRIDE")
  [[ "$SERVE_ENGINE" == target ]] && overrides+=("data.mode=remote")
  [[ -n "${STREAMING_NUM_WORKERS:-}" ]] && overrides+=("data.num_workers=${STREAMING_NUM_WORKERS}")
  local -a cmd
  split_train_args "$@"
  local -a train_args=("${TRAIN_OPTS[@]}" "${TRAIN_OVERRIDES[@]}" "${overrides[@]}")
  if ((total == 1)); then
    cmd=("$PY" -m "$TRAIN_ENTRY" "${train_args[@]}")
  else
    # --multi_gpu is accelerate's torchrun path; on CPU nodes it is also what starts several processes
    # (gloo), see docs/training.md. Precision is the trainer's own (training.dtype), hence "no" here.
    cmd=("$PY" -m accelerate.commands.launch --multi_gpu --num_machines "$machines" --machine_rank "$rank"
      --num_processes "$total" --mixed_precision no --dynamo_backend no --main_process_ip "${TRAINER_ADDR%:*}" --main_process_port "${TRAINER_ADDR##*:}"
      -m "$TRAIN_ENTRY" "${train_args[@]}")
  fi
  ((procs > 0)) || fail "no processes left for training on node ${NODE_ID} (TRAIN_PROCS_PER_NODE / GPUs)"
  log "trainer ${rank}/${machines} (${total} processes in all): ${cmd[*]}"
  proc_start_group - "${cmd[@]}"
  TRAIN_PID="$PROC_PID"
  rdv_publish "$RDV_DIR/trainer.${NODE_ID}.pid" "$TRAIN_PID"
  [[ -n "$SERVER_PID" ]] && guard=("$SERVER_PID" "the ${SERVE_ENGINE} server on node ${NODE_ID}")
  proc_watch "$RDV_DIR" "$TRAIN_PID" "${guard[@]}"
  proc_wait_exit "$TRAIN_PID"
  rc="$PROC_RC"
  TRAIN_PID=""
  wait "$PROC_WATCH_PID" 2>/dev/null || true
  if rdv_failed "$RDV_DIR"; then
    fail "training stopped: the job failed ($(rdv_failure_reason "$RDV_DIR"))"
  fi
  ((rc == 0)) || fail "training on node ${NODE_ID} exited with code ${rc}"
  if ((rank == 0)); then
    finish_head
  fi
}

# finish_head: the head trainer makes sure the export exists, then marks the job done.
finish_head() {
  local out="$JOB_OUTPUT_DIR"
  if [[ "$TRAIN_ENTRY" != modelopt_ext.train ]]; then
    rdv_mark_done "$RDV_DIR"
    log "done: ${TRAIN_ENTRY} finished"
    return 0
  fi
  PHASE="export on node ${NODE_ID}"
  if [[ ! -f "$out/export/config.json" ]]; then
    # Python knows which checkpoint is the newest COMPLETE one (training/checkpoint.py).
    "$PY" -m modelopt_ext.export --latest-in "$out" --out "$out/export" \
      || fail "training finished but exporting the newest complete checkpoint in ${out} failed (see above)"
  fi
  rdv_mark_done "$RDV_DIR"
  report_serve_events
  log "done: drafter exported to ${out}/export"
}

# report_serve_events: Python adds the serve nodes' restarts and give-ups to metrics.json and summary.txt
# and prints the one line; a report that cannot be written does not undo a finished, exported job.
report_serve_events() {
  local line
  if line="$("$PY" -m modelopt_ext.telemetry.serve_events --rendezvous "$RDV_DIR" \
    --serve-ids "$SERVE_NODE_IDS" --output "$JOB_OUTPUT_DIR")"; then
    log "$line"
  else
    log "warning: could not add the serve nodes' events to ${JOB_OUTPUT_DIR}/metrics.json (see above)"
  fi
}

# await_end: a non-head trainer waits (bounded) for the head's done marker, so the job's end means the
# export exists.
await_end() {
  local deadline=$((SECONDS + DONE_WAIT_S))
  until rdv_finished "$RDV_DIR"; do
    ((SECONDS < deadline)) || fail "no done marker from the head trainer within ${DONE_WAIT_S}s"
    sleep "${RDV_POLL_S:-1}"
  done
  rdv_failed "$RDV_DIR" && fail "the job failed after training ($(rdv_failure_reason "$RDV_DIR"))"
  return 0
}

# ------------------------------------------------------------------------------------------ main

main() {
  [[ $# -gt 0 ]] || { echo "usage: train_eagle_streaming.sh --config RECIPE.yaml [overrides] [--resume auto]" >&2; exit 2; }
  trap 'on_err $LINENO' ERR
  trap on_exit EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT
  : "${SERVE_NODE_IDS:?the launcher sets SERVE_NODE_IDS (docs/launcher.md)}"
  : "${TRAIN_NODE_IDS:?the launcher sets TRAIN_NODE_IDS (docs/launcher.md)}"
  RDV_DIR="$(rdv_job_dir)"
  mkdir -p "$RDV_DIR/logs"
  export RDV_DIR
  local role is_trainer=0
  role="$(plan_role "$NODE_ID")"
  _plan_contains "$TRAIN_NODE_IDS" "$NODE_ID" && is_trainer=1
  SINGLE_NODE=0
  [[ "$role" == serve && "$is_trainer" == 1 ]] && SINGLE_NODE=1
  log "role ${role}$([[ "$SINGLE_NODE" == 1 ]] && echo '+train') (serve ${SERVE_NODE_IDS}; train ${TRAIN_NODE_IDS}; map ${TRAINER_SERVER_MAP:-}; segment ${SEGMENT_SIZE:-none}) rendezvous ${RDV_DIR}"
  py_project "$ENTRY_REPO" || fail "no Python to run the project with on $(hostname)"
  PY="$MODELOPT_PYTHON"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  resolve_job "$@"

  if [[ "$role" == serve ]]; then
    serve
    if [[ "$SINGLE_NODE" == 1 ]]; then
      train "$@"
      stop_server
    else
      serve_until_finished
    fi
  else
    train "$@"
    [[ "$(plan_trainer_rank)" == 0 ]] || await_end
  fi
  PHASE="finished"
  log "node ${NODE_ID} finished"
}

# On one line with main: bash reads a script as it runs it, so an edit of this file during a long run
# must not be read as the next command.
{ main "$@"; exit $?; }
