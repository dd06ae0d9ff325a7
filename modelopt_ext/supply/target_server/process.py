"""Start `python -m modelopt_ext.serve_target` as a child process and wait, bounded, for the URL it publishes.

The one way Python code (benchmarks, tests) starts a real serve_target; node entry scripts start it from bash
(common/lib/proc.sh `proc_wait_healthy`). The child runs in its own session, so a caller can stop it and
anything it started as one process group.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


class ServeTargetStartError(RuntimeError):
    """serve_target exited, or published no URL in time; the first line says which, then its log's tail."""


def start_serve_target(
    args: Sequence[str],
    work: Path,
    *,
    timeout_s: float = 300.0,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    name: str = "serve_target",
) -> tuple[subprocess.Popen, str]:
    """Run serve_target with `args` (plus `--url-file`), its output in `work/<name>.log`; return (process, URL).

    Waits at most `timeout_s` for the URL file; on failure the process is killed and ServeTargetStartError
    names the reason and the log.
    """
    work.mkdir(parents=True, exist_ok=True)
    url_file, log_path = work / f"{name}.url", work / f"{name}.log"
    url_file.unlink(missing_ok=True)  # a reused folder: never read an earlier server's URL
    cmd = [sys.executable, "-m", "modelopt_ext.serve_target", *args, "--url-file", str(url_file)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    deadline = time.monotonic() + timeout_s
    while not url_file.is_file():
        if proc.poll() is not None:
            reason = f"serve_target exited with code {proc.returncode} before serving"
        elif time.monotonic() > deadline:
            proc.kill()
            proc.wait(30)
            reason = f"serve_target published no URL within {timeout_s:.0f} s"
        else:
            time.sleep(0.1)
            continue
        tail = log_path.read_text(errors="replace")[-2000:]
        raise ServeTargetStartError(f"{reason} (log {log_path})\n{tail}")
    return proc, url_file.read_text().strip()
