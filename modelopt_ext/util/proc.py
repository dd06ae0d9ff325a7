"""Child processes and ports: a free loopback port, and stopping a process group without leaving orphans.

Servers and workers are started with `start_new_session=True`, so each leads its own process group and
everything it spawned (vLLM's engine processes, DataLoader workers) can be stopped together.
Pure standard library: the launcher, benchmarks and tests use it too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on `host` right now (for a server started right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False when the group is already gone (or not ours)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def reap_group(pgid: int, grace_s: float = 10.0) -> None:
    """Give the processes left in group `pgid` up to `grace_s` to exit on their own (flushing logs), then SIGKILL."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not signal_group(pgid, 0):
            return
        time.sleep(0.2)
    signal_group(pgid, signal.SIGKILL)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 30.0) -> int | None:
    """Stop `proc` (started with start_new_session=True) and its group: `sig`, SIGKILL after `wait_s` seconds.

    Children may outlive the leader, so the group gets a final SIGKILL either way. Returns the exit code.
    """
    if proc.poll() is None:
        signal_group(proc.pid, sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait(wait_s)
    signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode
