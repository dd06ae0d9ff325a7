#!/usr/bin/env bash
# Read this node's role from the launcher's role plan (environment variables set by launcher/topology.py).
# The plan is never recomputed here: SERVE_NODE_IDS, TRAIN_NODE_IDS and TRAINER_SERVER_MAP are the truth.
# Source it; it defines functions only.

# _plan_contains LIST ID: true when comma-separated LIST holds ID.
_plan_contains() {
  local list=",$1," id="$2"
  [[ "$list" == *",${id},"* ]]
}

# plan_role [NODE_ID]: print "serve" or "train" for NODE_ID (default SLURM_NODEID, else 0).
plan_role() {
  local id="${1:-${SLURM_NODEID:-0}}"
  if _plan_contains "${SERVE_NODE_IDS:-}" "$id"; then
    echo serve
  elif _plan_contains "${TRAIN_NODE_IDS:-}" "$id"; then
    echo train
  else
    echo "node ${id} is in neither SERVE_NODE_IDS='${SERVE_NODE_IDS:-}' nor TRAIN_NODE_IDS='${TRAIN_NODE_IDS:-}'" >&2
    return 1
  fi
}

# plan_count LIST: number of ids in a comma-separated LIST.
plan_count() {
  local list="$1"
  [[ -z "$list" ]] && { echo 0; return 0; }
  awk -F, '{print NF}' <<<"$list"
}

# plan_trainer_rank [NODE_ID]: the node's index among trainer nodes (accelerate's --machine_rank).
plan_trainer_rank() {
  local id="${1:-${SLURM_NODEID:-0}}" i=0 t
  local -a ids
  IFS=, read -r -a ids <<<"${TRAIN_NODE_IDS:-}"
  for t in "${ids[@]}"; do
    if [[ "$t" == "$id" ]]; then
      echo "$i"
      return 0
    fi
    i=$((i + 1))
  done
  echo "node ${id} is not a trainer (TRAIN_NODE_IDS='${TRAIN_NODE_IDS:-}')" >&2
  return 1
}

# plan_preferred_server [NODE_ID]: the serve node id this trainer should prefer (same segment), or empty.
plan_preferred_server() {
  local id="${1:-${SLURM_NODEID:-0}}" pair
  local -a pairs
  IFS=, read -r -a pairs <<<"${TRAINER_SERVER_MAP:-}"
  for pair in "${pairs[@]}"; do
    if [[ "${pair%%:*}" == "$id" ]]; then
      echo "${pair#*:}"
      return 0
    fi
  done
}

# plan_head_trainer: the node id of the first trainer (it publishes the accelerate address and exports).
plan_head_trainer() {
  echo "${TRAIN_NODE_IDS%%,*}"
}
