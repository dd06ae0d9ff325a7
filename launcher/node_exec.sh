#!/usr/bin/env bash
# Runs one task's command on a node (Slurm or local): enter the repo so that relative paths in a task's
# args (recipes/..., common/...) resolve, make sure the shared scratch folder exists, then run the script.
# The launcher exports MODELOPT_REPO and MODELOPT_SCRATCH (docs/launcher.md, "The environment contract").
#   bash launcher/node_exec.sh SCRIPT [ARGS...]
set -euo pipefail

die() {
  echo "node_exec: $*" >&2
  exit 2
}

main() {
  [[ $# -ge 1 ]] || die "usage: node_exec.sh SCRIPT [ARGS...]"
  [[ -n "${MODELOPT_REPO:-}" && -d "${MODELOPT_REPO}" ]] \
    || die "MODELOPT_REPO='${MODELOPT_REPO:-}' is not a folder on $(hostname) (the repo must be on shared storage)"
  if [[ -n "${MODELOPT_SCRATCH:-}" ]]; then
    mkdir -p -- "${MODELOPT_SCRATCH}"
  fi
  cd -- "${MODELOPT_REPO}"
  exec bash "$@"
}

main "$@"
