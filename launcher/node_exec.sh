#!/usr/bin/env bash
# Runs one task's command on a node (Slurm or local): enter the repo so that relative paths in a task's
# args (recipes/..., common/...) resolve, make sure the shared scratch folder exists, then run the script.
# The launcher exports MODELOPT_REPO and MODELOPT_SCRATCH (docs/launcher.md, "The environment contract").
#   bash launcher/node_exec.sh SCRIPT [ARGS...]
#
# On a serve node of a plan with several serve nodes (the launcher's SERVE_NODE_IDS), the script runs as a
# child instead of being exec'd: when it dies (its server and script killed, say), the others serve on, and
# Slurm must not record this node's loss as the job's failure. This node then waits for the job's own end
# marker (done or failed, in its rendezvous folder) and exits 0 when the job finished. Every other node execs
# the script, so signals (Slurm's SIGTERM before a requeue, a trainer's checkpoint-and-exit) reach it as before.
set -euo pipefail

# The longest an orphaned serve node waits for the job's end marker; Slurm's time limit usually ends it first.
LOST_NODE_WAIT_S=$((7 * 24 * 3600))

usage_error() {
  echo "node_exec: $*" >&2
  exit 2
}

# expendable_serve_node: true on a serve node when the plan has at least two (the others carry the job).
expendable_serve_node() {
  [[ "$(plan_role 2>/dev/null)" == serve ]] && (($(plan_count "${SERVE_NODE_IDS:-}") >= 2))
}

# run_supervised SCRIPT [ARGS...]: run the script as a child, forwarding SIGTERM/SIGINT to it; when it fails
# without this node being told to stop, outlast it until the job's end marker decides this node's exit code.
run_supervised() {
  local child rc=0 signalled=0
  bash "$@" &
  child=$!
  # shellcheck disable=SC2064  # expand $child now: the trap must name this child
  trap "signalled=1; kill -TERM ${child} 2>/dev/null || true" TERM INT
  while :; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  trap - TERM INT
  if ((rc == 0 || signalled)); then
    return "$rc"
  fi
  outlast_lost_script "$rc"
}

# outlast_lost_script RC: the node script ended with RC while the job may still run on the other serve
# nodes. Wait (bounded) for the job's end marker: done -> 0 (this node's loss did not fail the job), else RC.
outlast_lost_script() {
  local rc="$1" dir
  dir="$(rdv_job_dir)" || return "$rc"
  if rdv_failed "$dir"; then
    return "$rc"
  fi
  log "this serve node's script ended with code ${rc}; the job goes on with the other serve nodes;" \
    "waiting (at most ${LOST_NODE_WAIT_S}s) for the job's end marker in ${dir}"
  if ! RDV_DIR="" rdv_wait_until "$LOST_NODE_WAIT_S" "the job's end marker in ${dir}" rdv_finished "$dir"; then
    log "no end marker in ${dir} after ${LOST_NODE_WAIT_S}s; ending with the script's code ${rc}"
    return "$rc"
  fi
  if [[ -e "$dir/done" ]]; then
    log "the job finished without this serve node (done marker): ending this node cleanly"
    return 0
  fi
  return "$rc"
}

main() {
  [[ $# -ge 1 ]] || usage_error "usage: node_exec.sh SCRIPT [ARGS...]"
  [[ -n "${MODELOPT_REPO:-}" && -d "${MODELOPT_REPO}" ]] \
    || usage_error "MODELOPT_REPO='${MODELOPT_REPO:-}' is not a folder on $(hostname) (the repo must be on shared storage)"
  if [[ -n "${MODELOPT_SCRATCH:-}" ]]; then
    mkdir -p -- "${MODELOPT_SCRATCH}"
  fi
  cd -- "${MODELOPT_REPO}"
  # shellcheck source=common/lib/log.sh
  source common/lib/log.sh
  # shellcheck source=common/lib/plan.sh
  source common/lib/plan.sh
  # shellcheck source=common/lib/rendezvous.sh
  source common/lib/rendezvous.sh
  if expendable_serve_node; then
    run_supervised "$@"
  else
    exec bash "$@"
  fi
}

main "$@"
