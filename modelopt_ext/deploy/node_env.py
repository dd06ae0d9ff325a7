"""Make a node's Python able to run this project: the container's own Python, topped up once per job.

On a cluster, nodes run our code from the repository on shared storage (MODELOPT_REPO) with the Python
of the task's container image (vLLM's GPU image: Python 3.12 with torch, vLLM, transformers, pydantic,
...). Some of what the trainer needs may be missing there (accelerate, matplotlib, ...). This module
decides, with the node's Python itself, what is missing, and provides it without touching the image:

- nothing missing: the node's Python is used as it is;
- something missing: a virtual environment that sees the image's packages after its own (the image's torch
  and vLLM stay; only what is missing is added) is built once under the job's scratch folder on shared storage,
  by whichever node gets the lock first; the others wait for it (bounded) and reuse it. Its marker file is
  written last, so a half-built environment is never used: a later attempt rebuilds it.
- nodes without network install from a wheelhouse that `wheelhouse` fills on a machine with network,
  with the same Python (e.g. the same container on a login node): NODE_WHEELHOUSE=DIR.

torch is never installed here: a node uses its image's torch build (the one that matches its GPUs and
driver), whatever its version. The launcher-only packages (nemo_run, leptonai) are never needed on nodes.

Pure standard library: this runs before anything else is importable.

The command is `python -m modelopt_ext.provision` (modelopt_ext/provision.py):

    python -m modelopt_ext.provision node --env-root DIR [--wheelhouse DIR] [--timeout S]   # prints the python
                                                      # to use instead of this one (nothing: this one is fine)
    python -m modelopt_ext.provision check                                                  # what is missing
    python -m modelopt_ext.provision wheelhouse --dest DIR                                  # for offline nodes
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

from modelopt_ext.util.fileio import exclusive_lock, write_json_atomic

REPO = Path(__file__).resolve().parents[2]
# Needed only where jobs are launched (login node), never on nodes.
LAUNCHER_ONLY = frozenset({"nemo-run", "leptonai"})
# Provided by the node's image, in the build that fits its hardware; checked, never installed.
FROM_IMAGE = frozenset({"torch"})
MARKER = "modelopt_ext_node_env.json"
DEFAULT_TIMEOUT_S = 900.0


class ProvisionError(RuntimeError):
    """The node's Python cannot be made ready (the message is one line)."""


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _split_requirement(req: str) -> tuple[str, str]:
    """'accelerate>=1.10' -> ('accelerate', '>=1.10'); markers are not used by this project's list."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$", req)
    if not m:
        raise ProvisionError(f"pyproject.toml: cannot read the requirement {req!r}")
    return _canon(m.group(1)), m.group(2).split(";")[0].strip()


def node_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The project's requirements that a node must satisfy from its own Python (launcher-only ones dropped)."""
    try:
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise ProvisionError(f"{pyproject}: cannot read [project].dependencies ({e})") from None
    return [r for r in deps if _split_requirement(r)[0] not in LAUNCHER_ONLY]


def _specifier_ok(version: str, spec: str) -> bool:
    """Does `version` satisfy `spec`? Uses `packaging` (or pip's copy of it); without either, presence only."""
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        try:
            from pip._vendor.packaging.specifiers import SpecifierSet
        except ImportError:
            return True
    return SpecifierSet(spec).contains(version, prereleases=True)


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements this interpreter does not satisfy (absent, or a version outside the range).

    FROM_IMAGE packages must be present (any version): their absence is an error, not something to install.
    """
    missing = []
    for req in requirements:
        name, spec = _split_requirement(req)
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in FROM_IMAGE:
                raise ProvisionError(
                    f"{sys.executable} has no {name}: use an image that ships it (e.g. vLLM's), or point "
                    f"MODELOPT_PYTHON at a Python that has it"
                ) from None
            missing.append(req)
            continue
        if name not in FROM_IMAGE and not _specifier_ok(version, spec):
            missing.append(req)
    return missing


def env_dir_for(env_root: Path, missing: list[str]) -> Path:
    """One environment per (interpreter, Python version, what is missing): nodes of one image share it."""
    key = json.dumps([sys.executable, sys.version, sorted(missing)])
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    return env_root / f"py{sys.version_info.major}{sys.version_info.minor}-{tag}"


def _env_python(env: Path) -> Path:
    return env / "bin" / "python"


def _run(cmd: list[str], timeout_s: float, what: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False, env=env)
    except subprocess.TimeoutExpired:
        raise ProvisionError(f"{what} ran past {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else "no output"
        raise ProvisionError(f"{what} failed (exit {proc.returncode}): {last}")


def _pip_source_args(wheelhouse: Path | None) -> list[str]:
    if wheelhouse is None:
        return []
    if not wheelhouse.is_dir():
        raise ProvisionError(f"NODE_WHEELHOUSE={wheelhouse}: not a folder")
    return ["--no-index", "--find-links", str(wheelhouse)]


def make_overlay(env: Path, timeout_s: float) -> None:
    """A venv at `env` that sees THIS interpreter's packages after its own.

    Not `venv --system-site-packages`: when this interpreter is itself a venv, that would expose the base
    interpreter's packages instead of this one's. A .pth file appends this interpreter's site folders.
    """
    import site

    _run([sys.executable, "-m", "venv", str(env)], timeout_s, f"creating {env}")
    (site_dir,) = (env / "lib").glob("python*/site-packages")
    image_dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    (site_dir / "zz_modelopt_ext_image.pth").write_text("".join(f"{d}\n" for d in image_dirs))


def build_env(env: Path, missing: list[str], wheelhouse: Path | None, timeout_s: float) -> Path:
    """Create the overlay `env` and install `missing` into it; marker written last."""
    import shutil

    if env.exists():  # a half-built one (no marker) from an attempt that died: start over
        shutil.rmtree(env)
    deadline = time.monotonic() + timeout_s
    make_overlay(env, timeout_s)
    pip = [str(_env_python(env)), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    hint = "" if wheelhouse else " (nodes without network: fill NODE_WHEELHOUSE, see docs/install.md)"
    remaining = max(1.0, deadline - time.monotonic())
    try:
        _run([*pip, *_pip_source_args(wheelhouse), *missing], remaining, f"pip install {' '.join(missing)}")
    except ProvisionError as e:
        raise ProvisionError(f"{e}{hint}") from None
    check = [str(_env_python(env)), "-m", "modelopt_ext.provision", "check", "--quiet"]
    _run(check, max(1.0, deadline - time.monotonic()), f"checking {env} after the install")
    write_json_atomic(env / MARKER, {"python": sys.executable, "installed": missing, "built_s": round(time.time())})
    return env


def ensure_node_python(env_root: Path, wheelhouse: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Path:
    """The interpreter a node should run the project with (this one, or a topped-up environment)."""
    missing = missing_requirements(node_requirements())
    if not missing:
        return Path(sys.executable)
    env = env_dir_for(env_root, missing)
    if (env / MARKER).is_file():
        return _env_python(env)
    log(f"{sys.executable} lacks {', '.join(missing)}: providing them in {env}")
    start = time.monotonic()
    try:
        with exclusive_lock(f"{env}.lock", timeout_s, f"the node environment {env}"):
            if not (env / MARKER).is_file():  # another node may have built it while we waited
                build_env(env, missing, wheelhouse, timeout_s)
                log(f"node environment ready in {time.monotonic() - start:.0f} s: {env}")
    except TimeoutError as e:
        raise ProvisionError(str(e)) from None
    return _env_python(env)


def fill_wheelhouse(dest: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Download, for THIS interpreter, the wheels that `node` would install (run it where there is network)."""
    import tempfile

    missing = missing_requirements(node_requirements())
    dest.mkdir(parents=True, exist_ok=True)
    if not missing:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        # What pip would install next to this interpreter's packages: resolve in a throwaway overlay env.
        env = Path(tmp) / "env"
        make_overlay(env, timeout_s)
        report = Path(tmp) / "report.json"
        cmd = [str(_env_python(env)), "-m", "pip", "install", "--disable-pip-version-check", "--dry-run",
               "--quiet", "--report", str(report), *missing]
        _run(cmd, timeout_s, "resolving the missing requirements")
        pins = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.loads(report.read_text())["install"]]
        _run([str(_env_python(env)), "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
              "--dest", str(dest), *pins], timeout_s, "downloading wheels")
    return pins


def log(msg: str) -> None:
    print(f"provision: {msg}", file=sys.stderr, flush=True)
