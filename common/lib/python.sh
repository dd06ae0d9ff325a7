#!/usr/bin/env bash
# The one place a node script picks a Python: the one that runs the project (py_project), and the one for the
# few standard-library snippets the shell library needs (py_stdlib). Source it; it defines functions only.
# Needs MODELOPT_REPO (the launcher exports it) or the caller's REPO argument.
#
# Knobs: MODELOPT_PYTHON (the candidate: a path or a command name; for container tasks the launcher sets
# it to the image's python3), NODE_ENV_ROOT (where top-up environments live; default
# $MODELOPT_SCRATCH/node-env), NODE_WHEELHOUSE (offline nodes), NODE_PROVISION_TIMEOUT_S (default 900).
# What is missing and how it is provided is decided in Python (modelopt_ext/provision.py, docs/install.md).

# py_candidate REPO: MODELOPT_PYTHON, else the repo's own environment, else python3 (as a full path).
py_candidate() {
  local repo="$1" py="${MODELOPT_PYTHON:-}"
  if [[ -z "$py" && -x "${repo}/.venv/bin/python" ]]; then
    py="${repo}/.venv/bin/python"
  fi
  py="${py:-python3}"
  command -v -- "$py" || {
    printf 'no Python interpreter %s on %s (set MODELOPT_PYTHON)\n' "$py" "$(hostname)" >&2
    return 2
  }
}

# py_project REPO: export MODELOPT_PYTHON as the interpreter that runs the project on this node, topping up
# the candidate's missing packages once per job (shared storage, bounded). Child scripts inherit it
# (MODELOPT_PYTHON_READY=1) and do not ask again. Returns non-zero, with a line on stderr, when no
# interpreter can run the project here.
py_project() {
  local repo="$1" py root timeout_s chosen
  if [[ "${MODELOPT_PYTHON_READY:-}" == 1 && -n "${MODELOPT_PYTHON:-}" ]]; then
    return 0
  fi
  py="$(py_candidate "$repo")" || return 2
  root="${NODE_ENV_ROOT:-${MODELOPT_SCRATCH:-${repo}/.cache}/node-env}"
  timeout_s="${NODE_PROVISION_TIMEOUT_S:-900}"
  # Bounded twice over: the lock wait and the build each get timeout_s inside Python.
  chosen="$(PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}" timeout "$((2 * timeout_s + 60))" \
    "$py" -m modelopt_ext.provision node --env-root "$root" --timeout "$timeout_s")" || {
    printf 'no usable Python for the project on %s (see the provision line above; docs/install.md)\n' \
      "$(hostname)" >&2
    return 2
  }
  # Empty: the candidate has everything; keep it exactly as named (a wrapper or symlink stays itself).
  export MODELOPT_PYTHON="${chosen:-$py}" MODELOPT_PYTHON_READY=1
}

# py_stdlib CODE [ARGS...]: run a standard-library-only Python snippet (what bash cannot do by itself: ask the
# kernel for a free port, an HTTP check where there is no curl) with the interpreter py_candidate picks,
# i.e. the project's once py_project chose it.
py_stdlib() {
  local py
  py="$(py_candidate "${MODELOPT_REPO:-}")" || return 2
  "$py" -c "$@"
}
