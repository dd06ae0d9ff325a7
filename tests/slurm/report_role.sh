#!/usr/bin/env bash
# Runs on every node of a launcher test job (tests/slurm/test_launcher_on_slurm.py): reports what the
# node sees of the launcher's plan into $MODELOPT_SCRATCH/roles/node-<SLURM_NODEID>.env, one KEY=VALUE
# per line, written atomically (temp + rename).
set -euo pipefail

# serve or train, from SERVE_NODE_IDS (the plan the launcher computed; never recomputed here).
role_of() {
  local node_id="$1" id
  local -a serve_ids
  IFS=',' read -r -a serve_ids <<<"${SERVE_NODE_IDS}"
  for id in "${serve_ids[@]}"; do
    if [[ "$id" == "$node_id" ]]; then
      echo serve
      return 0
    fi
  done
  echo train
}

main() {
  local node_id="${SLURM_NODEID:?SLURM_NODEID is not set: not running under srun}"
  local out="${MODELOPT_SCRATCH:?MODELOPT_SCRATCH is not set}/roles"
  local file="$out/node-$node_id.env"
  mkdir -p -- "$out"
  {
    echo "NODE_ID=$node_id"
    echo "HOSTNAME=$(hostname)"
    echo "ADDRESSES=$(hostname -I | xargs)"
    echo "ROLE=$(role_of "$node_id")"
    echo "SERVE_NODES=${SERVE_NODES}"
    echo "SERVE_NODE_IDS=${SERVE_NODE_IDS}"
    echo "TRAIN_NODE_IDS=${TRAIN_NODE_IDS}"
    echo "TRAINER_SERVER_MAP=${TRAINER_SERVER_MAP}"
    echo "SEGMENT_SIZE=${SEGMENT_SIZE}"
    echo "SLURM_NNODES=${SLURM_NNODES}"
    echo "MODELOPT_REPO=${MODELOPT_REPO}"
    echo "PWD=$PWD"
    echo "GREETING=${GREETING:-}"
    echo "ARGS=$*"
  } >"$file.tmp"
  mv -- "$file.tmp" "$file"
}

main "$@"
