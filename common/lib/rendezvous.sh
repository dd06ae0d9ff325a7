#!/usr/bin/env bash
# Rendezvous through files on shared storage: atomic publish, bounded waits, done/failed markers.
# Source it after python.sh (rdv_http_ok may need py_stdlib); it defines functions only. Every wait is bounded
# and says what it waited for.

# rdv_publish FILE CONTENT: write CONTENT to FILE atomically (temp file in the same folder, then rename),
# so a reader never sees a half-written address.
rdv_publish() {
  local file="$1" content="$2" tmp
  mkdir -p "$(dirname "$file")"
  tmp="$(mktemp "${file}.tmp.XXXXXX")"
  printf '%s\n' "$content" >"$tmp"
  mv -f "$tmp" "$file"
}

# rdv_read FILE: print FILE's first line (empty if absent).
rdv_read() {
  local file="$1"
  [[ -f "$file" ]] || return 0
  head -n 1 "$file"
}

# rdv_wait_until TIMEOUT_S WHAT CMD...: run CMD every RDV_POLL_S seconds until it succeeds (return 0).
# Returns 1 after TIMEOUT_S (the caller says what is missing), or 2 early, with a message, when the failed
# marker of RDV_DIR appears meanwhile: no node waits for peers of a job that already failed.
rdv_wait_until() {
  local timeout="$1" what="$2"
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    if [[ -n "${RDV_DIR:-}" ]] && rdv_failed "$RDV_DIR"; then
      echo "gave up waiting for ${what}: the job failed ($(rdv_failure_reason "$RDV_DIR"))" >&2
      return 2
    fi
    ((SECONDS >= deadline)) && return 1
    sleep "${RDV_POLL_S:-1}"
  done
}

# _rdv_missing FILE...: print the FILEs that do not exist (one per line).
_rdv_missing() {
  local f
  for f in "$@"; do
    [[ -e "$f" ]] || printf '%s\n' "$f"
  done
}

# _rdv_all_exist FILE...: true when every FILE exists.
_rdv_all_exist() {
  [[ -z "$(_rdv_missing "$@")" ]]
}

# rdv_wait_files TIMEOUT_S WHAT FILE...: wait until every FILE exists. On timeout, print which are
# missing and return 1. Returns 2 early if the failed marker of RDV_DIR appears meanwhile.
rdv_wait_files() {
  local timeout="$1" what="$2" rc=0
  shift 2
  rdv_wait_until "$timeout" "$what" _rdv_all_exist "$@" || rc=$?
  if ((rc == 1)); then
    echo "timed out after ${timeout}s waiting for ${what}; missing: $(_rdv_missing "$@" | tr '\n' ' ')" >&2
  fi
  return "$rc"
}

# rdv_http_ok URL: true when URL answers HTTP 2xx within 5 s. curl when present, else Python (py_stdlib:
# minimal images and chroots often have python3 but no curl).
rdv_http_ok() {
  local url="$1"
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -o /dev/null --max-time 5 "$url" 2>/dev/null
  else
    py_stdlib 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$url" 2>/dev/null
  fi
}

# rdv_wait_http TIMEOUT_S URL: wait until URL answers HTTP 2xx (bounded); return 1 on timeout.
rdv_wait_http() {
  local timeout="$1" url="$2" rc=0
  rdv_wait_until "$timeout" "$url" rdv_http_ok "$url" || rc=$?
  if ((rc == 1)); then
    echo "timed out after ${timeout}s waiting for ${url} to answer" >&2
  fi
  return "$rc"
}

# rdv_job_key: the name of this job's rendezvous folder: the Slurm job id (plus the restart count after a
# requeue, so a requeued job never sees the markers of its previous attempt), else the launcher's run id and
# task for local runs.
rdv_job_key() {
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    local restart="${SLURM_RESTART_COUNT:-0}"
    if [[ "$restart" == 0 ]]; then
      printf '%s\n' "$SLURM_JOB_ID"
    else
      printf '%s.r%s\n' "$SLURM_JOB_ID" "$restart"
    fi
  else
    printf 'local-%s-%s\n' "${MODELOPT_RUN_ID:-run}" "${MODELOPT_TASK:-task}"
  fi
}

# rdv_job_dir: this job's rendezvous folder on shared storage, $MODELOPT_SCRATCH/rendezvous/<job key>.
rdv_job_dir() {
  [[ -n "${MODELOPT_SCRATCH:-}" ]] || { echo "MODELOPT_SCRATCH is not set (the launcher sets it)" >&2; return 1; }
  printf '%s/rendezvous/%s\n' "$MODELOPT_SCRATCH" "$(rdv_job_key)"
}

# rdv_ordered_urls DIR PREFERRED_ID ID...: the URLs published in DIR/server.<id>, comma-joined, the
# preferred server (same segment) first and the others after it in plan order. Fails naming an empty file.
rdv_ordered_urls() {
  local dir="$1" preferred="$2" id url
  shift 2
  local -a ordered=()
  [[ -n "$preferred" ]] && ordered+=("$preferred")
  for id in "$@"; do
    [[ "$id" == "$preferred" ]] || ordered+=("$id")
  done
  local -a urls=()
  for id in "${ordered[@]}"; do
    url="$(rdv_read "$dir/server.$id")"
    [[ -n "$url" ]] || { echo "server address file $dir/server.$id is empty or missing" >&2; return 1; }
    urls+=("$url")
  done
  local IFS=,
  printf '%s\n' "${urls[*]}"
}

# rdv_mark_done DIR: tell every node the job finished successfully.
rdv_mark_done() {
  rdv_publish "$1/done" "$(date -u +%FT%TZ)"
}

# rdv_mark_failed DIR REASON: tell every node the job failed, and why. The first reason wins.
rdv_mark_failed() {
  local dir="$1" reason="$2"
  [[ -e "$dir/failed" ]] && return 0
  rdv_publish "$dir/failed" "node ${SLURM_NODEID:-0}: ${reason}"
}

# rdv_failed DIR: true when the failed marker exists.
rdv_failed() {
  [[ -e "$1/failed" ]]
}

# rdv_finished DIR: true when the job ended either way (done or failed).
rdv_finished() {
  [[ -e "$1/done" || -e "$1/failed" ]]
}

# rdv_failure_reason DIR: the recorded failure reason.
rdv_failure_reason() {
  rdv_read "$1/failed"
}

# rdv_advertise_ip: the address other nodes should use to reach this one. SERVE_ADVERTISE_IP wins;
# a one-node job (SLURM_NNODES unset or 1) uses loopback, since every peer is on this machine;
# otherwise the source address of the default route, then the first non-loopback address.
rdv_advertise_ip() {
  if [[ -n "${SERVE_ADVERTISE_IP:-}" ]]; then
    printf '%s\n' "$SERVE_ADVERTISE_IP"
    return 0
  fi
  if [[ "${SLURM_NNODES:-1}" == "1" ]]; then
    printf '127.0.0.1\n'
    return 0
  fi
  local ip=""
  if command -v ip >/dev/null 2>&1; then
    ip="$(ip -4 route get 1.1.1.1 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "src") {print $(i + 1); exit}}')"
    if [[ -z "$ip" ]]; then
      ip="$(ip -4 -o addr show scope global 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}')"
    fi
  fi
  if [[ -z "$ip" ]]; then
    ip="$(hostname -I 2>/dev/null | awk '{print $1}')"
  fi
  [[ -n "$ip" ]] || ip="127.0.0.1"
  printf '%s\n' "$ip"
}
