"""Node-side provisioning on the real local Slurm cluster: a node Python that lacks the project's packages.

The CPU analogue of a fresh container image: a virtual environment with torch only (as vLLM's image has
torch, but not accelerate or matplotlib). The test nodes have no network (each is a network namespace),
like many GPU clusters: the packages come from a wheelhouse filled beforehand by
`python -m modelopt_ext.provision wheelhouse` with the same Python (docs/install.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from slurm_testlib import SlurmCluster

from modelopt_ext.deploy import node_env as provision

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[2]
LOCAL_WHEELS = Path("/opt/wheels")


def _run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


@pytest.fixture(scope="module")
def image_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python with torch (the same build as ours) and pip, and nothing else of the project's needs."""
    root = tmp_path_factory.mktemp("image")
    base = shutil.which("python3.11") or shutil.which("python3")
    assert base, "no python3 on PATH"
    made = _run([base, "-m", "venv", str(root / "venv")])
    assert made.returncode == 0, made.stderr
    py = root / "venv" / "bin" / "python"
    uv = shutil.which("uv")
    assert uv, "uv is not on PATH (README's first step installs it)"
    links = ["--find-links", str(LOCAL_WHEELS)] if LOCAL_WHEELS.is_dir() else []
    inst = _run([uv, "pip", "install", "--python", str(py), *links, f"torch=={torch.__version__}"], timeout=900)
    assert inst.returncode == 0, inst.stderr[-2000:]
    return py


def _env_for(py: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_check_lists_what_the_image_lacks(image_python: Path):
    proc = _run([str(image_python), "-m", "modelopt_ext.provision", "check"], env=_env_for(image_python))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lacking = {provision._split_requirement(r)[0] for r in proc.stdout.split()}
    assert {"accelerate", "transformers", "pydantic"} <= lacking, lacking
    assert "torch" not in lacking and "nemo-run" not in lacking and "leptonai" not in lacking


@pytest.fixture(scope="module")
def wheelhouse(image_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the image lacks, downloaded for it on a machine with network (this one), torch excluded."""
    dest = tmp_path_factory.mktemp("wheelhouse")
    proc = _run(
        [str(image_python), "-m", "modelopt_ext.provision", "wheelhouse", "--dest", str(dest)],
        env=_env_for(image_python), timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = sorted(p.name for p in dest.iterdir())
    assert any(w.startswith("accelerate-") for w in wheels) and any(w.startswith("pydantic-") for w in wheels)
    assert not any(w.startswith(("torch-", "nvidia_")) for w in wheels), wheels
    return dest


def _spec(tmp: Path, nodes: int, env: dict[str, str]) -> Path:
    lines = [
        "job_name: node_provision",
        "pipeline:",
        "  task_0:",
        "    script: tests/slurm/node_python_report.sh",
        "    environment:",
        *[f"      - {k}: {v!r}" for k, v in env.items()],
        "    slurm_config:",
        "      _factory_: slurm_factory",
        "      host: localhost",
        f"      nodes: {nodes}",
        "      ntasks_per_node: 1",
        '      time: "00:15:00"',
    ]
    path = tmp / "spec.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _launch(cluster: SlurmCluster, spec: Path, job_dir: Path) -> subprocess.CompletedProcess[str]:
    env = cluster.env()
    env.pop("MODELOPT_JOB_DIR", None)
    cmd = [sys.executable, str(REPO / "launch.py"), "--yaml", str(spec), "--job-dir", str(job_dir),
           "--run-id", "r1", "--yes"]
    return _run(cmd, timeout=1500, cwd=REPO, env=env)


def test_offline_nodes_provision_once_from_the_wheelhouse(
    slurm_cluster: SlurmCluster, image_python: Path, wheelhouse: Path, tmp_path: Path
):
    env = {"MODELOPT_PYTHON": str(image_python), "NODE_WHEELHOUSE": str(wheelhouse),
           "NODE_PROVISION_TIMEOUT_S": "600"}
    proc = _launch(slurm_cluster, _spec(tmp_path, 2, env), tmp_path / "jobs")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scratch = tmp_path / "jobs" / "node_provision" / "r1" / "scratch"
    reports = {p.name: dict(ln.split("=", 1) for ln in p.read_text().splitlines())
               for p in sorted((scratch / "py").glob("node-*.txt"))}
    assert sorted(reports) == ["node-0.txt", "node-1.txt"], reports
    built = sorted(p for p in (scratch / "node-env").iterdir() if p.is_dir())
    assert len(built) == 1, built  # one environment for the job, shared by both nodes
    assert (built[0] / provision.MARKER).is_file()
    image_root = image_python.parent.parent
    for report in reports.values():
        assert report["python"] == str(built[0] / "bin" / "python"), report
        # torch is the image's own build; what was missing comes from the topped-up environment.
        assert report["torch"].startswith(str(image_root)), report
        assert report["transformers"].startswith(str(built[0])), report
    assert not list(built[0].glob("lib/python*/site-packages/torch"))


def test_a_node_that_cannot_provision_fails_with_one_line(
    slurm_cluster: SlurmCluster, image_python: Path, tmp_path: Path
):
    empty = tmp_path / "empty-wheelhouse"
    empty.mkdir()
    env = {"MODELOPT_PYTHON": str(image_python), "NODE_WHEELHOUSE": str(empty), "NODE_PROVISION_TIMEOUT_S": "300"}
    proc = _launch(slurm_cluster, _spec(tmp_path, 1, env), tmp_path / "jobs")
    assert proc.returncode != 0
    logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "jobs").rglob("*.out"))
    logs += "\n".join(p.read_text(errors="replace") for p in (tmp_path / "jobs").rglob("*.log"))
    line = next((ln for ln in logs.splitlines() if "provision: error:" in ln), None)
    assert line is not None, (proc.stdout + logs)[-3000:]
    assert "pip install" in line and "No matching distribution" in line, line
