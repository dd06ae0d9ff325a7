#!/usr/bin/env bash
# Device check of the trainer, one table (docs/benchmarks.md): bf16 training of the tiny EAGLE-3 head
# colocated and through serve_target (NCCL data plane), the TTT memory sweep, and the comparison with
# nvidia-modelopt when it is importable. Needs no network and no uv.
#
#   modelopt_ext/bench/gpu_check.sh            # on a machine with an NVIDIA GPU
#   modelopt_ext/bench/gpu_check.sh --cpu      # small CPU smoke run of every section
#
# Environment: PYTHON (interpreter; default: the one common/lib/python.sh picks: MODELOPT_PYTHON, else the
# repo's .venv, else python3), WHEELS (a folder of wheels to install offline into
# a private target folder first), OUT (write gpu_check.txt/.json and the logs there), GPU_CHECK_TIMEOUT
# (seconds for the whole check, default 420). Decisions live in modelopt_ext/bench/gpu_check.py.
set -euo pipefail

repo_root() {
    cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd
}

install_wheels() {
    # Offline install of the given wheels into a folder on PYTHONPATH (never into the system site-packages).
    local wheels="$1" target="$2"
    echo "[gpu_check] installing wheels from ${wheels} into ${target} (offline)"
    mkdir -p "${target}"
    "${PYTHON}" -m pip install --quiet --no-index --no-deps --find-links "${wheels}" --target "${target}" \
        "${wheels}"/*.whl
}

main() {
    local root
    root="$(repo_root)"
    # shellcheck source=common/lib/python.sh
    source "${root}/common/lib/python.sh"
    PYTHON="$(MODELOPT_PYTHON="${PYTHON:-${MODELOPT_PYTHON:-}}" py_candidate "${root}")"
    export PYTHON
    local extra=""
    if [[ -n "${WHEELS:-}" ]]; then
        extra="${root}/.cache/gpu_check_site"
        install_wheels "${WHEELS}" "${extra}"
    fi
    export PYTHONPATH="${root}${extra:+:${extra}}${PYTHONPATH:+:${PYTHONPATH}}"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    local limit="${GPU_CHECK_TIMEOUT:-420}"
    echo "[gpu_check] ${PYTHON} ($("${PYTHON}" --version 2>&1)), repo ${root}, limit ${limit} s"
    cd "${root}"
    # The Python side bounds each section; this bounds the whole, with a message if it fires.
    local rc=0
    timeout --signal=TERM --kill-after=20 "${limit}" "${PYTHON}" -m modelopt_ext.bench.gpu_check "$@" || rc=$?
    if [[ "${rc}" -eq 124 ]]; then
        echo "[gpu_check] stopped: the whole check ran past ${limit} s (GPU_CHECK_TIMEOUT)" >&2
    fi
    return "${rc}"
}

main "$@"
