#!/usr/bin/env bash
# Runs on every node of the provisioning test (tests/slurm/test_node_provision.py): picks the project's
# Python through common/lib/python.sh (as every entry script does), then reports, from that Python, where
# torch and transformers come from into $MODELOPT_SCRATCH/py/node-<SLURM_NODEID>.txt (atomic rename).
set -euo pipefail

main() {
  local repo="${MODELOPT_REPO:?MODELOPT_REPO is not set}" out="${MODELOPT_SCRATCH:?}/py"
  # shellcheck source=/dev/null # the repo's library; checked on its own (tests/common)
  source "${repo}/common/lib/python.sh"
  py_project "$repo" || exit 2
  mkdir -p -- "$out"
  "$MODELOPT_PYTHON" -m modelopt_ext.provision check
  "$MODELOPT_PYTHON" - "$out/node-${SLURM_NODEID:-0}.txt" <<'PY'
import os, sys
import accelerate, pydantic, torch, transformers
from modelopt_ext.config.recipe import load_recipe  # noqa: F401  (the trainer's config layer imports)
path = sys.argv[1]
with open(path + ".tmp", "w") as f:
    f.write(f"python={sys.executable}\ntorch={torch.__file__}\ntransformers={transformers.__file__}\n")
os.replace(path + ".tmp", path)
PY
}

main "$@"
