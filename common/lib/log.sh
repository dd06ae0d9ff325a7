#!/usr/bin/env bash
# Logging helpers shared by the node entry scripts. Source it; it defines functions only.

# log MESSAGE...: a timestamped line on stderr naming this node, so interleaved Slurm logs stay readable.
log() {
  printf '%s [node %s] %s\n' "$(date -u +%H:%M:%S)" "${SLURM_NODEID:-0}" "$*" >&2
}

# die MESSAGE...: log and exit non-zero (the caller's EXIT trap records the failure).
die() {
  log "ERROR: $*"
  exit 1
}
