"""Following Slurm jobs without accounting: squeue, then scontrol; never-satisfiable dependencies cancelled.

The Slurm client is replaced by a scripted runner here (logic only); tests/slurm runs the real cluster.
"""

from __future__ import annotations

from launcher.follow import follow, query


class FakeSlurm:
    """Answers squeue/scontrol from a list of snapshots; records scancel calls."""

    def __init__(self, snapshots):
        self.snapshots = snapshots
        self.step = 0
        self.cancelled: list[str] = []

    def __call__(self, argv):
        snap = self.snapshots[min(self.step, len(self.snapshots) - 1)]
        if argv[0] == "squeue":
            self.step += 1
            rows = [f"{j}|{s}|{r}" for j, (s, r, queued) in snap.items() if queued]
            return 0, "\n".join(rows) + "\n", ""
        if argv[0] == "scontrol":
            jid = argv[-1]
            if jid in snap and not snap[jid][2]:
                state, reason, _ = snap[jid]
                code = "0:0" if state == "COMPLETED" else "3:0"
                return (
                    0,
                    f"JobId={jid} JobName=x JobState={state} Reason={reason} ExitCode={code} Other=1",
                    "",
                )
            return 1, "", "slurm_load_jobs error: Invalid job id specified"
        if argv[0] == "scancel":
            self.cancelled.extend(argv[1:])
            return 0, "", ""
        raise AssertionError(argv)


def test_follow_to_the_end_and_cancel_jobs_that_can_never_start():
    fake = FakeSlurm(
        [
            {"1": ("RUNNING", "None", True), "2": ("PENDING", "Dependency", True)},
            {"1": ("FAILED", "NonZeroExitCode", False), "2": ("PENDING", "DependencyNeverSatisfied", True)},
            {"1": ("FAILED", "NonZeroExitCode", False), "2": ("CANCELLED", "None", False)},
        ]
    )
    seen = []
    final = follow(["1", "2"], runner=fake, poll_s=0, on_change=lambda st: seen.append((st.job_id, st.state)))
    assert final["1"].state == "FAILED" and final["1"].exit_code == "3:0"
    assert final["2"].state == "NOT_RUN" and "DependencyNeverSatisfied" in final["2"].reason
    assert fake.cancelled == ["2"]
    assert seen == [("1", "RUNNING"), ("2", "PENDING"), ("1", "FAILED"), ("2", "NOT_RUN")]


def test_purged_job_is_unknown_and_follow_is_bounded():
    fake = FakeSlurm([{"7": ("RUNNING", "None", True)}])
    final = follow(["7"], runner=fake, poll_s=0, timeout_s=0.05, sleep=lambda s: None)
    assert final["7"].state == "RUNNING"  # still running when the bound hit: reported as is
    gone = FakeSlurm([{}])
    assert query(["9"], gone)["9"].state == "UNKNOWN"


def test_end_state_seen_once_is_kept_after_slurm_purges_the_job():
    # A pipeline's first task ends long before the last (MinJobAge purges it meanwhile): its COMPLETED stays.
    fake = FakeSlurm(
        [
            {"1": ("RUNNING", "None", True), "2": ("RUNNING", "None", True)},
            {"1": ("COMPLETED", "None", False), "2": ("RUNNING", "None", True)},
            {"1": ("COMPLETED", "None", False), "2": ("RUNNING", "None", True)},
            {"2": ("RUNNING", "None", True)},  # job 1 purged from here on
            {"2": ("RUNNING", "None", True)},
            {"2": ("COMPLETED", "None", False)},
            {"2": ("COMPLETED", "None", False)},
        ]
    )
    final = follow(["1", "2"], runner=fake, poll_s=0, sleep=lambda s: None)
    assert final["1"].state == "COMPLETED" and final["1"].exit_code == "0:0"
    assert final["2"].state == "COMPLETED"
