#!/usr/bin/env bash
# Placeholder for the streaming EAGLE-3 entry script (serve nodes + trainer nodes). It exists so job specs
# that reference it validate and dry-run; the real script lands with the multi-node orchestration issue.
# It prints this node's role from the launcher's env contract (docs/launcher.md) and stops with exit 3.
set -euo pipefail

print_role() {
  local node="${SLURM_NODEID:-0}"
  local role="train"
  if [[ ",${SERVE_NODE_IDS:-}," == *",${node},"* ]]; then
    role="serve"
    if [[ ",${TRAIN_NODE_IDS:-}," == *",${node},"* ]]; then
      role="serve+train"
    fi
  fi
  echo "node ${node}: role ${role} (SERVE_NODE_IDS=${SERVE_NODE_IDS:-} TRAIN_NODE_IDS=${TRAIN_NODE_IDS:-} TRAINER_SERVER_MAP=${TRAINER_SERVER_MAP:-})"
}

main() {
  print_role
  echo "not built yet: the streaming entry script lands with the multi-node orchestration issue" >&2
  exit 3
}

main "$@"
