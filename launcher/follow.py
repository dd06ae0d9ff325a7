"""Follow submitted Slurm jobs to the end with squeue / scontrol (no accounting needed: sacct may not exist).

Commands are called by name from PATH (or through the SSH tunnel), so a folder of wrapper commands that
enter a test cluster's network namespace works when it leads PATH.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "NOT_RUN",
    "UNKNOWN",
}
#: Pending reasons that can never clear: the job would wait forever, so it is cancelled and marked NOT_RUN.
NEVER_RUNS = {"DependencyNeverSatisfied", "InvalidDependency"}

Runner = Callable[[list[str]], tuple[int, str, str]]


def local_runner(argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
    """Run a Slurm client command from PATH; (returncode, stdout, stderr). Bounded by `timeout`."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: command not found on PATH"
    except subprocess.TimeoutExpired:
        return 124, "", f"{' '.join(argv)}: no answer within {timeout:.0f} s"
    return p.returncode, p.stdout, p.stderr


def tunnel_runner(tunnel) -> Runner:
    """A Runner over a nemo_run tunnel (SSH)."""

    def run(argv: list[str]) -> tuple[int, str, str]:
        r = tunnel.run(" ".join(shlex.quote(a) for a in argv), hide=True, warn=True)
        return r.return_code, r.stdout, r.stderr

    return run


@dataclass
class JobState:
    """Where one Slurm job stands."""

    job_id: str
    state: str
    exit_code: str = ""
    reason: str = ""

    @property
    def done(self) -> bool:
        """Reached a state it will not leave."""
        return self.state in TERMINAL


def _scontrol_fields(text: str) -> dict[str, str]:
    out = {}
    for word in text.split():
        if "=" in word:
            k, _, v = word.partition("=")
            out.setdefault(k, v)
    return out


def query(job_ids: Iterable[str], runner: Runner = local_runner) -> dict[str, JobState]:
    """State of each job: squeue for queued/running ones, scontrol for the ones that left the queue."""
    ids = list(job_ids)
    states: dict[str, JobState] = {}
    rc, out, _ = runner(["squeue", "-h", "-o", "%i|%T|%r", "-j", ",".join(ids)])
    if rc == 0:
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] in ids:
                states[parts[0]] = JobState(parts[0], parts[1], reason=parts[2])
    for jid in ids:
        if jid in states:
            continue
        rc, out, _ = runner(["scontrol", "show", "job", "-o", jid])
        f = _scontrol_fields(out) if rc == 0 else {}
        if f.get("JobState"):
            states[jid] = JobState(jid, f["JobState"], f.get("ExitCode", ""), f.get("Reason", ""))
        else:
            # Gone from squeue and purged from scontrol (MinJobAge): finished, outcome unknown.
            states[jid] = JobState(jid, "UNKNOWN", reason="left the queue before its end state was seen")
    return states


def follow(
    job_ids: list[str],
    *,
    runner: Runner = local_runner,
    poll_s: float = 0.5,
    max_poll_s: float = 15.0,
    timeout_s: float = 3600.0,
    on_change: Callable[[JobState], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, JobState]:
    """Poll until every job is in a terminal state or `timeout_s` passes (then the rest keep their state).

    The poll interval starts at `poll_s` and grows by half each time up to `max_poll_s`.

    A job pending on a dependency that can never be satisfied (an earlier task failed) is cancelled with
    scancel and reported as NOT_RUN, so no allocation waits forever.
    """
    deadline = time.monotonic() + timeout_s
    delay = poll_s
    last: dict[str, str] = {}
    not_run: dict[str, str] = {}
    current: dict[str, JobState] = {}
    final: dict[str, JobState] = {}  # end states already seen: kept (Slurm purges finished jobs after MinJobAge)
    while True:
        open_ids = [jid for jid in job_ids if jid not in final]
        current = {**final, **(query(open_ids, runner) if open_ids else {})}
        for jid in job_ids:
            st = current[jid]
            if jid not in not_run and st.state == "PENDING" and st.reason in NEVER_RUNS:
                runner(["scancel", jid])
                not_run[jid] = f"cancelled: {st.reason} (an earlier task failed)"
            if jid in not_run:
                st.state, st.reason = "NOT_RUN", not_run[jid]
            if on_change and last.get(jid) != st.state:
                on_change(st)
            last[jid] = st.state
            if st.done:
                final[jid] = st
        if all(s.done for s in current.values()) or time.monotonic() > deadline:
            return current
        sleep(delay)
        delay = min(delay * 1.5, max_poll_s)  # quick jobs are seen quickly, long ones polled gently
