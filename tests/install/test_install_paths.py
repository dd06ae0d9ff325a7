"""Both install paths of docs/install.md, from the committed pyproject.toml and uv.lock.

- This machine kind (the default groups): torch is the local CPU build, no CUDA package in the environment.
- Anywhere else (`UV_NO_GROUP=local-cpu`): torch 2.13.0 and its CUDA packages come from the package index.
  The "elsewhere" test hides the local wheel folder and uv's cache in a private mount namespace, resolves the
  full install (torch included, from metadata), installs everything except the multi-GB CUDA wheels, and
  dry-runs every example with the result, as a login node without GPUs would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_WHEELS = Path("/opt/wheels")
# The multi-GB wheels the "elsewhere" test resolves but does not download.
HEAVY_PREFIXES = ("nvidia-", "cuda-")
HEAVY_NAMES = ("torch", "triton")


def _uv() -> str:
    exe = shutil.which("uv")
    if exe is None:
        pytest.fail("uv is not on PATH: install it with `pip install uv` (README's first step)")
    return exe


def _lock() -> dict:
    return tomllib.loads((REPO / "uv.lock").read_text())


def _torch_entries(lock: dict) -> dict[str, dict]:
    return {p["version"]: p for p in lock["package"] if p["name"] == "torch"}


def test_lock_has_both_torch_builds_selected_by_group():
    """The lock holds the local CPU build for the `local-cpu` group and the index build otherwise."""
    entries = _torch_entries(_lock())
    assert set(entries) == {"2.13.0", "2.13.0+cpu"}, f"torch builds in uv.lock: {sorted(entries)}"
    assert entries["2.13.0+cpu"]["source"] == {"registry": str(LOCAL_WHEELS)}
    assert "registry" in entries["2.13.0"]["source"] and entries["2.13.0"]["source"]["registry"] != str(
        LOCAL_WHEELS
    )
    project = next(p for p in _lock()["package"] if p["name"] == "modelopt-ext")
    markers = {d["version"]: d.get("marker", "") for d in project["dependencies"] if d["name"] == "torch"}
    assert "local-cpu" in markers["2.13.0+cpu"] and "!=" in markers["2.13.0"], markers


def test_pyproject_default_groups_and_conflict():
    """The default groups pick the local build; the two torch groups can never be active together."""
    uv = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["uv"]
    assert "local-cpu" in uv["default-groups"]
    assert [{"group": "local-cpu"}, {"group": "cuda"}] in uv["conflicts"]


def test_lock_is_current():
    """`uv lock --check`: pyproject.toml and uv.lock agree (a stale lock breaks `uv run --locked` for users)."""
    proc = subprocess.run(
        [_uv(), "lock", "--check"], check=False, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_this_environment_has_the_local_cpu_torch():
    """README's commands on this machine kind run on the local CPU wheel: no CUDA package was installed."""
    import importlib.metadata as md

    import torch

    if not LOCAL_WHEELS.is_dir():
        pytest.fail(f"{LOCAL_WHEELS} is missing: this test describes the project's CI machine kind")
    assert torch.__version__ == "2.13.0+cpu"
    cuda_dists = sorted(
        d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].startswith("nvidia-")
    )
    assert cuda_dists == [], f"CUDA packages in the CPU environment: {cuda_dists}"


def _copy_tracked_tree(dest: Path) -> None:
    """The files a clean clone would have (tracked, plus new files not ignored), as they are now."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = Path(raw.decode())
        src = REPO / rel
        if not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


ELSEWHERE_SCRIPT = r"""
set -euo pipefail
# Hide this machine kind's local wheels (and anything uv cached from them) for this namespace only.
if [[ -d /opt/wheels ]]; then mount -t tmpfs none /opt/wheels; fi
test -z "$(ls -A /opt/wheels 2>/dev/null)" || { echo "local wheel folder still visible" >&2; exit 90; }
export UV_NO_GROUP=local-cpu UV_CACHE_DIR="$WORK/uv-cache" UV_PROJECT_ENVIRONMENT="$WORK/venv"
export UV_PYTHON_DOWNLOADS=never
cd "$WORK/repo"
echo "== resolve the full install (nothing downloaded)"
uv sync --locked --dry-run 2>&1 | tee "$WORK/dry-run.txt"
echo "== install all but the CUDA wheels"
uv sync --locked $NO_INSTALL
echo "== dry-run every example"
for spec in $(find examples -name '*.yaml' | sort); do
  echo "-- $spec"
  uv run --no-sync launch.py --yaml "$spec" --dryrun > "$WORK/dryrun.${spec//\//_}.txt"
done
echo "ELSEWHERE OK"
"""


@pytest.mark.e2e
def test_install_elsewhere_without_local_wheels(tmp_path):
    """docs/install.md on a machine without /opt/wheels: resolves, installs, validates and dry-runs."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail(
            "this test needs root and `unshare` (util-linux) to hide /opt/wheels in a mount namespace"
        )
    lock = _lock()
    heavy = sorted(
        {
            p["name"]
            for p in lock["package"]
            if p["name"] in HEAVY_NAMES or p["name"].startswith(HEAVY_PREFIXES)
        }
    )
    assert "torch" in heavy and any(n.startswith("nvidia-") for n in heavy), heavy
    (tmp_path / "repo").mkdir()
    _copy_tracked_tree(tmp_path / "repo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))}
    env.update(WORK=str(tmp_path), NO_INSTALL=" ".join(f"--no-install-package {n}" for n in heavy))
    env["PATH"] = f"{Path(_uv()).parent}:{env.get('PATH', '')}"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", ELSEWHERE_SCRIPT],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ELSEWHERE OK" in out, out[-4000:]
    dry = (tmp_path / "dry-run.txt").read_text()
    # The full install takes the index's torch (the CUDA build) with its CUDA packages, never the local file.
    assert "torch==2.13.0" in dry and "2.13.0+cpu" not in dry, dry[-2000:]
    assert "nvidia-" in dry
    venv_py = tmp_path / "venv" / "bin" / "python"
    code = (
        "import importlib.util as u; "
        "print(*(u.find_spec(m) is not None for m in ('torch', 'nemo_run', 'transformers')))"
    )
    probe = subprocess.run(
        [str(venv_py), "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert probe.stdout.split() == ["False", "True", "True"], probe.stdout + probe.stderr
    specs = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "examples").rglob("*.yaml"))
    assert specs
    for spec in specs:
        text = (tmp_path / f"dryrun.{spec.replace('/', '_')}.txt").read_text()
        assert "dry run" in text.lower(), f"{spec}: {text[:400]}"
