"""modelopt_ext.provision's decisions (the real-node path is tests/slurm/test_node_provision.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelopt_ext.deploy import node_env as provision

REPO = Path(__file__).resolve().parents[2]


def test_node_requirements_drop_launcher_only_packages():
    reqs = provision.node_requirements()
    names = {provision._split_requirement(r)[0] for r in reqs}
    assert "torch" in names and "transformers" in names and "pydantic" in names
    assert not names & {"nemo-run", "leptonai"}


def test_split_requirement_normalises_names():
    assert provision._split_requirement("Nemo_Run==0.11.1") == ("nemo-run", "==0.11.1")
    assert provision._split_requirement("pydantic>=2.10,<3") == ("pydantic", ">=2.10,<3")
    assert provision._split_requirement("foo[bar] >=1 ; python_version<'3.12'") == ("foo", ">=1")


def test_missing_requirements_absent_or_out_of_range():
    missing = provision.missing_requirements(["pytest>=1", "pytest>=999", "surely-not-installed-pkg>=1"])
    assert missing == ["pytest>=999", "surely-not-installed-pkg>=1"]


def test_image_packages_are_checked_never_installed(monkeypatch):
    # torch's version is the image's business: any version passes ...
    assert provision.missing_requirements(["torch==0.0.1"]) == []
    # ... and its absence is an error naming the interpreter, not something to install.
    monkeypatch.setattr(provision, "FROM_IMAGE", frozenset({"surely-not-installed-pkg"}))
    with pytest.raises(provision.ProvisionError, match="has no surely-not-installed-pkg"):
        provision.missing_requirements(["surely-not-installed-pkg"])


def test_nothing_missing_returns_this_interpreter(tmp_path):
    assert provision.ensure_node_python(tmp_path / "envs") == Path(sys.executable)
    assert not (tmp_path / "envs").exists()  # nothing built, nothing locked


def test_env_dir_depends_on_what_is_missing(tmp_path):
    a = provision.env_dir_for(tmp_path, ["accelerate>=1.10"])
    assert a == provision.env_dir_for(tmp_path, ["accelerate>=1.10"])
    assert a != provision.env_dir_for(tmp_path, ["accelerate>=1.10", "matplotlib>=3.8"])
    assert a.name.startswith(f"py{sys.version_info.major}{sys.version_info.minor}-")


def test_cli_without_torch_is_one_line_exit_2(tmp_path):
    """A Python without torch (here: the system one with our repo on its path, no venv) gets one line."""
    bare = subprocess.run([sys.executable, "-S", "-c", "import sys; print(sys.version)"], capture_output=True,
                          text=True, check=False)
    assert bare.returncode == 0
    # -S: no site-packages, so no torch: the CLI must refuse in one line, exit 2.
    proc = subprocess.run([sys.executable, "-S", "-m", "modelopt_ext.provision", "check"], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("provision: error:") and "has no torch" in lines[0], lines


def test_cli_node_prints_nothing_when_this_python_has_everything(tmp_path):
    """Empty output tells common/lib/python.sh to keep the interpreter exactly as the user named it."""
    proc = subprocess.run(
        [sys.executable, "-m", "modelopt_ext.provision", "node", "--env-root", str(tmp_path / "envs")],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and not (tmp_path / "envs").exists()
