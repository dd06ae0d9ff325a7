"""launcher/nemo.py reads nemo_run's private attributes for the launcher; here against the installed nemo_run
(a release that renames one fails these tests, and the launcher, with one line naming it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from launcher.nemo import (
    TESTED_VERSION,
    NemoRunChanged,
    dryrun_script,
    experiment_dir,
    import_nemo_run,
    reset_packaging,
)


def test_the_installed_nemo_run_is_the_tested_one():
    from importlib.metadata import version

    # A new release may still work, but its private attributes must be checked first (the tests below).
    assert version("nemo_run") == TESTED_VERSION, "check launcher/nemo.py against this nemo_run, then bump"


def test_adapter_reads_a_real_dry_run(tmp_path, monkeypatch):
    import os
    import sys

    # nemo_run's invoke mirrors stdin into its commands (the launcher gives them /dev/null too).
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # noqa: SIM115
    run = import_nemo_run(tmp_path / ".nemo_run")
    executor = run.SlurmExecutor(
        account="acct",
        nodes=2,
        ntasks_per_node=1,
        time="00:05:00",
        tunnel=run.LocalTunnel(job_dir=str(tmp_path / "experiments")),
        packager=run.Packager(),
        poll_estimated_start_time=False,
    )
    exp = run.Experiment(
        "adapter", id="adapter_1", base_dir=str(tmp_path), clean_mode=True, enable_goodbye_message=False,
        skip_status_at_exit=True, log_level="WARN",
    )  # fmt: skip
    with exp:
        exp.add(run.Script(inline="echo hello"), executor=executor, name="task_0")
        exp.dryrun(log=False, delete_exp_dir=False)
        script = dryrun_script(exp.jobs[0])
        folder = experiment_dir(exp)
        assert folder.is_dir() and folder.is_relative_to(tmp_path)
        reset_packaging(exp)
        assert all(not t.packaging_jobs for t in exp.tunnels.values())
    assert "#SBATCH --account=acct" in script and "#SBATCH --nodes=2" in script, script


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: dryrun_script(SimpleNamespace()), "_dryrun_info"),
        (lambda: dryrun_script(SimpleNamespace(_dryrun_info=None)), "_dryrun_info"),
        (lambda: dryrun_script(SimpleNamespace(_dryrun_info=SimpleNamespace())), "request"),
        (lambda: experiment_dir(SimpleNamespace(exp_dir="/x")), "_exp_dir"),
        (lambda: reset_packaging(SimpleNamespace(tunnels={"t": SimpleNamespace()})), "packaging_jobs"),
    ],
)
def test_a_changed_nemo_run_is_one_clear_error(call, name):
    with pytest.raises(NemoRunChanged, match=rf"^nemo_run \S+ has no SimpleNamespace\.{name} \(the launcher "
                                             rf"reads it for .*launcher/nemo\.py adapts nemo_run {TESTED_VERSION}"):  # fmt: skip
        call()
