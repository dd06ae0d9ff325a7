"""Helpers for tests on the local Slurm clusters (tests/slurm/cluster.sh): the cluster handle, job waits,
timings, and the check that a stopped cluster left nothing behind. Fixtures live in conftest.py."""

from __future__ import annotations

import fcntl
import os
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

CLUSTER_SH = Path(__file__).with_name("cluster.sh")
REGISTRY_DIR = Path("/run/mos-test-slurm")
INSTALL_TIMEOUT_S = 600
UP_TIMEOUT_S = 120
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "OUT_OF_MEMORY",
}

# Measured times, printed in the terminal summary (and with -s as they happen).
TIMINGS: list[str] = []


def record_timing(line: str) -> None:
    """Keep one measured time for the end-of-session summary and print it now (visible with -s)."""
    TIMINGS.append(line)
    print(f"[slurm timing] {line}")


@dataclass(frozen=True)
class JobResult:
    """What Slurm says about a finished job."""

    job_id: int
    state: str
    exit_code: str
    elapsed_s: float
    record: dict[str, str]


@dataclass
class SlurmCluster:
    """A running test cluster: where its state lives and how to talk to it.

    `bin_dir` holds wrappers (sbatch, squeue, scontrol, scancel, sinfo, srun, salloc, sacct) that run the
    real client inside the cluster; put it first on PATH (see `env()`) and any program that calls
    `sbatch` by name submits here.
    """

    version: str
    cluster_id: str
    state_dir: Path
    bin_dir: Path
    slurm_conf: Path
    controller: str
    nodes: list[str]
    node_ips: list[str]
    chroot: Path | None
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> SlurmCluster:
        """Read the cluster.env that `cluster.sh up` wrote."""
        values: dict[str, str] = {}
        for line in (state_dir / "cluster.env").read_text().splitlines():
            key, _, raw = line.partition("=")
            parts = shlex.split(raw)
            values[key] = parts[0] if len(parts) == 1 else " ".join(parts)
        return cls(
            version=values["VERSION"],
            cluster_id=values["CLUSTER_ID"],
            state_dir=Path(values["STATE_DIR"]),
            bin_dir=Path(values["BIN_DIR"]),
            slurm_conf=Path(values["SLURM_CONF"]),
            controller=values["CONTROLLER"],
            nodes=values["NODES"].split(),
            node_ips=values["NODE_IPS"].split(),
            chroot=Path(values["CHROOT"]) if values.get("CHROOT") else None,
        )

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose PATH finds this cluster's client wrappers first."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(
        self, *args: str, cwd: Path | str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (e.g. `run("squeue", "-h")`) against this cluster; output as text."""
        proc = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            check=False,
            cwd=cwd,
            env=self.env(),
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def sbatch(
        self,
        script: Path | str,
        *options: str,
        script_args: Sequence[str] = (),
        cwd: Path | str | None = None,
    ) -> int:
        """Submit with `sbatch --parsable [options] script [script_args]`; returns the job id."""
        proc = self.run("sbatch", "--parsable", *options, str(script), *script_args, cwd=cwd)
        return int(proc.stdout.strip().split(";")[0])

    def job_ids(self) -> set[int]:
        """Ids of the jobs the controller still lists as pending or running."""
        out = self.run("squeue", "-h", "-o", "%i").stdout
        return {int(x) for x in out.split()}

    def job_record(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (finished jobs stay visible about 300 s; there is no sacct)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        record: dict[str, str] = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                record.setdefault(key, value)
        return record

    def wait_job(self, job_id: int, timeout: float = 120, poll_s: float = 0.1) -> JobResult:
        """Wait until the job reaches a final state; fail the test with the job record on timeout."""
        start = time.monotonic()
        record: dict[str, str] = {}
        while time.monotonic() - start < timeout:
            record = self.job_record(job_id)
            if record.get("JobState") in FINAL_STATES:
                return JobResult(
                    job_id, record["JobState"], record.get("ExitCode", ""), time.monotonic() - start, record
                )
            time.sleep(poll_s)
        raise AssertionError(f"job {job_id} did not finish within {timeout}s; last record: {record}")

    def submit_and_wait(
        self,
        script: Path | str,
        *options: str,
        script_args: Sequence[str] = (),
        cwd: Path | str | None = None,
        timeout: float = 120,
    ) -> JobResult:
        """Submit and wait; `elapsed_s` of the result is submit-to-finish."""
        start = time.monotonic()
        job_id = self.sbatch(script, *options, script_args=script_args, cwd=cwd)
        result = self.wait_job(job_id, timeout=timeout)
        return JobResult(
            result.job_id, result.state, result.exit_code, time.monotonic() - start, result.record
        )


# The environment pytest started with: cluster.sh may run in a background thread while a test has
# changed os.environ (PATH, for example) for itself.
_START_ENV = dict(os.environ)


def cluster_sh(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run tests/slurm/cluster.sh; its log lines are on stderr."""
    return subprocess.run(
        ["/bin/bash", str(CLUSTER_SH), *args],
        check=False,
        text=True,
        capture_output=True,
        timeout=timeout,
        env=_START_ENV,
    )


def namespace_inodes(cluster_id: str) -> set[int]:
    """Inodes of the cluster's network namespaces (take them before `down`, check them after)."""
    netns = Path("/run/netns")
    return {p.stat().st_ino for p in netns.glob(f"mos-{cluster_id}-*")} if netns.is_dir() else set()


def processes_in_namespaces(inodes: set[int]) -> list[int]:
    """Live processes whose network namespace is one of `inodes` (zombies have none)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "ns" / "net").stat().st_ino in inodes:
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def leftovers(cluster_id: str, chroot: Path | None, inodes: set[int] = frozenset()) -> list[str]:
    """What a stopped cluster must not leave behind: namespaces, processes in them (`inodes`, taken from
    `namespace_inodes` before stopping), hosts lines, mounts."""
    found = []
    pids = processes_in_namespaces(set(inodes))
    if pids:
        found.append(f"processes still in the cluster's namespaces {pids}")
    netns = Path("/run/netns")
    names = sorted(p.name for p in netns.glob(f"mos-{cluster_id}-*")) if netns.is_dir() else []
    if names:
        found.append(f"network namespaces {names}")
    tag = f"# mos-test-slurm {cluster_id}"
    lines = [line for line in Path("/etc/hosts").read_text().splitlines() if line.endswith(tag)]
    if lines:
        found.append(f"/etc/hosts lines {lines}")
    if chroot is not None:
        mounts = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(f"{chroot}/")
        ]
        if mounts:
            found.append(f"mounts {mounts}")
    return found


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class SessionRegistry:
    """Which pytest sessions use a cluster, so the last one out stops it (pid files under /run)."""

    def __init__(self, cluster_id: str):
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        self.users = REGISTRY_DIR / f"{cluster_id}.users"
        self.users.mkdir(exist_ok=True)
        self.lock_path = REGISTRY_DIR / f"{cluster_id}.session.lock"
        self.me = self.users / str(os.getpid())

    def __enter__(self) -> Self:
        self._fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + UP_TIMEOUT_S
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {UP_TIMEOUT_S}s for {self.lock_path}") from None
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)

    def join(self) -> None:
        self.me.touch()

    def leave(self) -> bool:
        """Unregister; True when no other live session still uses the cluster."""
        self.me.unlink(missing_ok=True)
        for other in self.users.iterdir():
            if other.name.isdigit() and _pid_alive(int(other.name)):
                return False
            other.unlink(missing_ok=True)
        return True
