"""util/proc: a free port is bindable; stop_group stops a leader and its children, even one that ignores
SIGTERM (real processes, bounded waits)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from modelopt_ext.util.proc import free_port, reap_group, stop_group

# A leader that ignores SIGTERM and starts a child that ignores it too; prints the child's pid.
_STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_stop_group_kills_a_leader_and_child_that_ignore_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUBBORN], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    child = int(proc.stdout.readline())
    assert _alive(child)
    t0 = time.monotonic()
    rc = stop_group(proc, signal.SIGTERM, wait_s=1.0)
    assert rc == -signal.SIGKILL and time.monotonic() - t0 < 10
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    reap_group(proc.pid, grace_s=0.5)  # what is left of the group (a zombie at most): no error
