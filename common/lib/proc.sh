#!/usr/bin/env bash
# Child processes of the node entry scripts: each long-running child (a server, a training launcher) runs
# in its own process group, so stopping it stops everything it started (vLLM's engine, accelerate's ranks).
# Source it after log.sh, python.sh and rendezvous.sh; it defines functions only. Every wait is bounded.

# proc_start_group LOGFILE CMD...: start CMD in the background in a new process group (setsid), stdout and
# stderr appended to LOGFILE (or inherited when LOGFILE is "-"). Sets PROC_PID (= the group id).
# A background child of a non-interactive shell is never a group leader, so setsid does not fork and $!
# is CMD's own pid.
proc_start_group() {
  local logfile="$1"
  shift
  if [[ "$logfile" == "-" ]]; then
    setsid "$@" &
  else
    mkdir -p "$(dirname "$logfile")"
    setsid "$@" >>"$logfile" 2>&1 &
  fi
  # shellcheck disable=SC2034 # read by the caller
  PROC_PID=$!
}

# proc_alive PID: true while PID exists and is not a zombie (a dead child not yet waited for). Reads
# /proc directly: minimal images and chroots may have no `ps`.
proc_alive() {
  local pid="$1" stat
  kill -0 "$pid" 2>/dev/null || return 1
  stat="$(cat "/proc/${pid}/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ "${stat:0:1}" != Z ]]
}

# proc_group_alive PGID: true while a live (non-zombie) process of group PGID is left. Zombies do not
# count: a dead leader we have not waited for yet, or orphans where PID 1 does not reap, would otherwise
# look alive for ever. Reads /proc with builtins only (no fork per process).
proc_group_alive() {
  local pgid="$1" f line state grp rest
  for f in /proc/[0-9]*/stat; do
    { read -r line <"$f"; } 2>/dev/null || continue
    rest="${line##*) }"
    read -r state _ grp _ <<<"$rest"
    [[ "$grp" == "$pgid" && "$state" != Z ]] && return 0
  done
  return 1
}

# proc_tree_groups PID: the process groups of PID and of all its live descendants, one per line. Some
# children leave their parent's group on purpose (torchrun starts each rank with start_new_session, vLLM
# its engine), so stopping only the leader's group could orphan them.
proc_tree_groups() {
  local root="$1" f line rest state ppid grp pid
  local -A parent_of=() group_of=()
  for f in /proc/[0-9]*/stat; do
    { read -r line <"$f"; } 2>/dev/null || continue
    pid="${line%% *}"
    rest="${line##*) }"
    read -r state ppid grp _ <<<"$rest"
    [[ "$state" == Z ]] && continue
    parent_of[$pid]="$ppid"
    group_of[$pid]="$grp"
  done
  local -A seen=()
  local -a queue=("$root")
  local -A groups=()
  [[ -n "${group_of[$root]:-}" ]] && groups[${group_of[$root]}]=1
  while ((${#queue[@]})); do
    local cur="${queue[0]}"
    queue=("${queue[@]:1}")
    for pid in "${!parent_of[@]}"; do
      if [[ "${parent_of[$pid]}" == "$cur" && -z "${seen[$pid]:-}" ]]; then
        seen[$pid]=1
        queue+=("$pid")
        groups[${group_of[$pid]}]=1
      fi
    done
  done
  ((${#groups[@]})) && printf '%s\n' "${!groups[@]}"
  return 0
}

# _proc_any_alive PGID...: true while any of the groups has a live process.
_proc_any_alive() {
  local g
  for g in "$@"; do
    proc_group_alive "$g" && return 0
  done
  return 1
}

# proc_stop_group PGID [GRACE_S]: SIGTERM to the group and to the groups of all its descendants, SIGKILL
# to what is left after GRACE_S (default 20). Returns once they are gone (after the KILL: at most 5 s more).
proc_stop_group() {
  local pgid="$1" grace="${2:-20}" deadline g
  [[ -n "$pgid" ]] || return 0
  local -a stop=()
  mapfile -t stop < <(proc_tree_groups "$pgid")
  [[ " ${stop[*]} " == *" ${pgid} "* ]] || stop+=("$pgid")
  _proc_any_alive "${stop[@]}" || return 0
  for g in "${stop[@]}"; do
    kill -TERM -- "-$g" 2>/dev/null || true
  done
  deadline=$((SECONDS + grace))
  while _proc_any_alive "${stop[@]}" && ((SECONDS < deadline)); do
    sleep 0.5
  done
  if _proc_any_alive "${stop[@]}"; then
    log "process group ${pgid} (with groups ${stop[*]}) still running ${grace}s after SIGTERM: SIGKILL"
    for g in "${stop[@]}"; do
      kill -KILL -- "-$g" 2>/dev/null || true
    done
    # SIGKILL is delivered asynchronously: wait (bounded) so callers see the groups gone on return.
    deadline=$((SECONDS + 5))
    while _proc_any_alive "${stop[@]}" && ((SECONDS < deadline)); do
      sleep 0.1
    done
  fi
}

# proc_wait_exit PID: wait for a child of THIS shell and set PROC_RC to its exit code (never trips
# `set -e`). Call it directly, not in $(...): a subshell cannot wait for its parent's children.
# shellcheck disable=SC2034 # PROC_RC is read by the caller
proc_wait_exit() {
  local pid="$1"
  PROC_RC=0
  wait "$pid" || PROC_RC=$?
}

# proc_watch RDV_DIR PGID [GUARD_PID GUARD_NAME]: start a background watcher (its pid in PROC_WATCH_PID)
# that stops process group PGID as soon as the failed marker appears in RDV_DIR, or, when a guard is given,
# as soon as GUARD_PID is gone (a colocated server that died), recording that as the failure first.
# It ends by itself once PGID is gone. Poll period: RDV_POLL_S (default 1 s).
proc_watch() {
  local dir="$1" pgid="$2" guard="${3:-}" guard_name="${4:-}"
  (
    trap - EXIT ERR
    while proc_group_alive "$pgid"; do
      if [[ -n "$guard" ]] && ! proc_alive "$guard"; then
        rdv_mark_failed "$dir" "${guard_name} (pid ${guard}) exited"
      fi
      if rdv_failed "$dir"; then
        log "stopping process group ${pgid}: the job failed ($(rdv_failure_reason "$dir"))"
        proc_stop_group "$pgid" "${PROC_STOP_GRACE_S:-20}"
        exit 0
      fi
      sleep "${RDV_POLL_S:-1}"
    done
  ) &
  # shellcheck disable=SC2034 # read by the caller
  PROC_WATCH_PID=$!
}

# proc_wait_healthy PID URL TIMEOUT_S WHAT: bounded wait until URL answers HTTP 2xx while PID (the server
# we started, named WHAT in messages) lives. Returns 0 once it answers; else 1 with the reason in
# PROC_WAIT_ERR: WHAT exited (its code in PROC_RC), the job ended (RDV_DIR's done or failed marker), or
# TIMEOUT_S passed. Poll period: RDV_POLL_S (default 1 s).
# shellcheck disable=SC2034 # PROC_WAIT_ERR is read by the caller
proc_wait_healthy() {
  local pid="$1" url="$2" timeout="$3" what="$4" deadline
  deadline=$((SECONDS + timeout))
  PROC_WAIT_ERR=""
  until rdv_http_ok "$url"; do
    if ! proc_alive "$pid"; then
      proc_wait_exit "$pid"
      PROC_WAIT_ERR="${what} exited with code ${PROC_RC} before answering ${url}"
      return 1
    fi
    if [[ -n "${RDV_DIR:-}" ]] && rdv_finished "$RDV_DIR"; then
      local reason
      reason="$(rdv_failure_reason "$RDV_DIR")"
      PROC_WAIT_ERR="the job ended (${reason:-done}) while waiting for ${what} to answer ${url}"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      PROC_WAIT_ERR="${what} did not answer ${url} within ${timeout}s"
      return 1
    fi
    sleep "${RDV_POLL_S:-1}"
  done
}

# proc_port_free PORT: true when nothing on this host listens on TCP PORT.
proc_port_free() {
  local port="$1"
  ! (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null
}

# proc_free_port: print a TCP port nothing listens on (asks the kernel, through py_stdlib).
proc_free_port() {
  py_stdlib 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1]); s.close()'
}
