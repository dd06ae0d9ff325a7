"""Fixtures for tests on a real multi-node Slurm cluster on this machine (tests/slurm/cluster.sh).

`slurm_cluster` is Slurm 22.05 with 3 nodes (jobs run natively); `slurm_cluster_2411` is Slurm 24.11 with
4 nodes in blocks of 2 (`TopologyPlugin=topology/block`, for `--segment`; jobs run inside a Debian 13
chroot that sees /tmp and the repository at the same paths). Both are session-scoped, install what they
need (apt, debootstrap) and are torn down at the end of the session, unless another pytest session on
this machine still uses them (each session registers itself; the last one out stops the cluster).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_testlib import (
    INSTALL_TIMEOUT_S,
    TIMINGS,
    UP_TIMEOUT_S,
    SessionRegistry,
    SlurmCluster,
    cluster_sh,
    leftovers,
    namespace_inodes,
    record_timing,
)

REPO = Path(__file__).resolve().parents[2]


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the cluster timings measured during the session."""
    if TIMINGS:
        terminalreporter.section("local Slurm cluster timings")
        for line in TIMINGS:
            terminalreporter.write_line(line)


FIXTURE_VERSIONS = {"slurm_cluster": "22.05", "slurm_cluster_2411": "24.11", "slurm_2205_installed": "22.05"}


class _Installs:
    """Installs Slurm in a background thread as soon as the session knows it will need it.

    Installing 24.11 (debootstrap) takes minutes on a fresh machine; started when collection ends, it
    overlaps with the tests that run before the Slurm ones. A fixture waits for its version's install.
    """

    def __init__(self) -> None:
        self.results: dict[str, tuple[int, str, float]] = {}
        self.thread: threading.Thread | None = None

    def start(self, versions: list[str]) -> None:
        self.thread = threading.Thread(target=self._run, args=(versions,), name="slurm-install", daemon=True)
        self.thread.start()

    def _run(self, versions: list[str]) -> None:
        for version in versions:  # one after the other: both may need apt
            self.results[version] = self._install(version)

    @staticmethod
    def _install(version: str) -> tuple[int, str, float]:
        start = time.monotonic()
        try:
            proc = cluster_sh("install", "--version", version, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return 1, f"cluster.sh install --version {version} ran past {INSTALL_TIMEOUT_S}s", 0.0
        return proc.returncode, proc.stderr, time.monotonic() - start

    def wait(self, version: str) -> tuple[int, str, float]:
        """(returncode, stderr, seconds) of installing `version`, running it now if nobody started it."""
        deadline = time.monotonic() + INSTALL_TIMEOUT_S * 2
        while self.thread is not None and self.thread.is_alive() and version not in self.results:
            if time.monotonic() > deadline:
                return 1, f"the background install of slurm {version} did not finish in time", 0.0
            time.sleep(0.2)
        if version not in self.results:
            self.results[version] = self._install(version)
        return self.results[version]


INSTALLS = _Installs()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start installing the Slurm versions the selected tests need, in the background."""
    if session.config.option.collectonly or os.geteuid() != 0:
        return
    needed = {
        version
        for item in session.items
        for name, version in FIXTURE_VERSIONS.items()
        if name in getattr(item, "fixturenames", ())
    }
    if needed:
        INSTALLS.start(sorted(needed))


def _start_cluster(version: str, nodes: int) -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.fail(
            "the local Slurm cluster needs root (network namespaces, mounts, apt); run the tests as root"
        )
    start = time.monotonic()
    returncode, stderr, install_s = INSTALLS.wait(version)
    if returncode != 0:
        pytest.fail(f"cannot install Slurm {version} for the test cluster:\n{stderr}", pytrace=False)
    waited_s = time.monotonic() - start
    cluster_id = {"22.05": "s22", "24.11": "s24"}[version]
    registry = SessionRegistry(cluster_id)
    with registry:
        start = time.monotonic()
        binds = []
        if version == "24.11":
            # Jobs in the chroot see these at the same paths: pytest's temp folders, this repo, and the
            # interpreter the repo's .venv links to (so jobs there run the project's Python).
            for folder in dict.fromkeys(["/tmp", tempfile.gettempdir(), str(REPO), sys.base_prefix]):
                binds += ["--bind", folder]
        proc = cluster_sh(
            "up", "--version", version, "--nodes", str(nodes), "--timeout", "60", *binds, timeout=UP_TIMEOUT_S
        )
        up_s = time.monotonic() - start
        if proc.returncode != 0:
            pytest.fail(f"cannot start the Slurm {version} test cluster:\n{proc.stderr}", pytrace=False)
        registry.join()
    cluster = SlurmCluster.from_state_dir(Path(proc.stdout.strip().splitlines()[-1]))
    cluster.timings.update(install_s=install_s, up_s=up_s)
    reused = "already up" in proc.stderr
    record_timing(
        f"slurm {version}: install/check {install_s:.1f}s (the fixture waited {waited_s:.1f}s for it), "
        f"{'reuse of a running cluster' if reused else 'start to all-idle'} {up_s:.1f}s "
        f"({len(cluster.nodes)} nodes)"
    )
    try:
        yield cluster
    finally:
        with registry:
            if registry.leave():
                inodes = namespace_inodes(cluster_id)
                proc = cluster_sh("down", "--version", version, timeout=UP_TIMEOUT_S)
                left = leftovers(cluster_id, cluster.chroot, inodes)
                assert proc.returncode == 0 and not left, (
                    f"cluster.sh down (slurm {version}) failed or left things behind: {left}\n{proc.stderr}"
                )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Slurm 22.05, 3 nodes, each in its own network namespace; jobs run natively on this machine."""
    yield from _start_cluster("22.05", 3)


@pytest.fixture(scope="session")
def slurm_cluster_2411() -> Iterator[SlurmCluster]:
    """Slurm 24.11, 4 nodes in topology blocks of 2 (for --segment); jobs run in the Debian 13 chroot."""
    yield from _start_cluster("24.11", 4)


@pytest.fixture(scope="session")
def slurm_2205_installed() -> None:
    """Slurm 22.05 installed (no cluster started): for tests that run cluster.sh themselves."""
    if os.geteuid() != 0:
        pytest.fail(
            "the local Slurm cluster needs root (network namespaces, mounts, apt); run the tests as root"
        )
    returncode, stderr, _ = INSTALLS.wait("22.05")
    if returncode != 0:
        pytest.fail(f"cannot install Slurm 22.05 for the test cluster:\n{stderr}", pytrace=False)
