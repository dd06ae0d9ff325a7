"""The product's main job end to end on the real local Slurm cluster (tests/slurm/cluster.sh).

- `examples/local/slurm_streaming_eagle3.yaml` through `launcher.run_job` on Slurm 22.05 (3 nodes): data task,
  then the streaming train task (node 0 a real vLLM hidden-state server, CPU build; nodes 1-2 ONE accelerate
  DDP job across both nodes, gloo), then the export check and the benchmark (afterok chaining).
- Slurm 24.11 with `segment: 2` (4 nodes, blocks of 2): the segment-aware plan (serve 0,2; train 1,3;
  each trainer prefers the server of its own segment) and the rendezvous, with the transformers
  target server (serve_target) for speed.
- Faults (serve_target for a fast start): the server killed mid-training; a trainer killed mid-training,
  then a relaunch with `--resume auto` that continues from the last checkpoint; `scontrol requeue` of a
  running job (the requeued attempt resumes by itself); a lost server and a lost serve node with 2 serve
  nodes (serve_target, and a vLLM variant) that the job survives.
Measured times go to the "local Slurm cluster timings" section (and stdout with -s).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from slurm_testlib import (
    SlurmCluster,
    cluster_sh,
    leftovers,
    namespace_inodes,
    processes_in_namespaces,
    record_timing,
)

from launcher import run_job

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "local" / "slurm_streaming_eagle3.yaml"


# ------------------------------------------------------------------------------------------ helpers


def _on_cluster(monkeypatch, cluster, tmp_path: Path) -> Path:
    """Make the launcher submit to `cluster` (its wrappers first on PATH); returns a fresh job dir."""
    monkeypatch.setenv("PATH", f"{cluster.bin_dir}{os.pathsep}{os.environ['PATH']}")
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    return job_dir


def _read_logs(task) -> str:
    return "\n".join(Path(p).read_text(errors="replace") for p in task.log_paths if Path(p).is_file())


def _runtime_s(cluster, job_id) -> float | None:
    """Slurm's RunTime of a recently finished job in seconds (None once Slurm purged it: MinJobAge)."""
    proc = cluster.run("scontrol", "-o", "show", "job", str(job_id), check=False)
    m = re.search(r"RunTime=(?:\d+-)?(\d+):(\d+):(\d+)", proc.stdout)
    return int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) if m else None


def _phases(tasks, start_wall: float) -> dict[str, float]:
    """Seconds per task, from the end times (last write) of the tasks' logs: each task's phase runs from
    the previous task's end (afterok chaining; Slurm schedules at once here) to its own."""
    out, prev = {}, start_wall
    for t in tasks:
        end = max(Path(p).stat().st_mtime for p in t.log_paths if Path(p).is_file())
        out[t.name] = end - prev
        prev = end
    return out


def _write_spec(tmp_path: Path, name: str, spec: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _train_only_spec(
    output_dir: Path,
    *,
    nodes: int,
    max_steps: int,
    save_interval: int,
    extra_env=None,
    extra_args=(),
    segment=None,
    serve_nodes=1,
    time_limit="00:20:00",
) -> dict:
    """A one-task job: the streaming entry script with serve_target (fast start), fixed output folder."""
    # Ports apart from the example's (8765, 29500): Slurm may place these jobs on nodes the pipeline uses.
    env = [
        {"SERVE_NODES": str(serve_nodes)},
        {"SERVE_ENGINE": "target"},
        {"STREAMING_NUM_WORKERS": "0"},
        {"RDV_POLL_S": "0.5"},
        {"SERVE_PORT": "8799"},
        {"MAIN_PROCESS_PORT": "29599"},
    ]
    env += [{k: v} for k, v in (extra_env or {}).items()]
    slurm = {
        "_factory_": "slurm_factory",
        "host": "localhost",
        "nodes": nodes,
        "ntasks_per_node": 1,
        "time": time_limit,
    }
    if segment:
        slurm["segment"] = segment
    return {
        "job_name": "e2e_streaming_faults",
        "pipeline": {
            "task_0": {
                "script": "common/eagle3/train_eagle_streaming.sh",
                "args": [
                    "--config recipes/eagle3/tiny.yaml",
                    "model.path=outputs/tiny/target",
                    f"training.output_dir={output_dir}",
                    f"training.max_steps={max_steps}",
                    f"training.save_interval={save_interval}",
                    "training.log_interval=2",
                    "training.batch_size=4",
                    *extra_args,
                ],
                "environment": env,
                "slurm_config": slurm,
            }
        },
    }


def _rdv_dir(res, job_id) -> Path:
    return Path(res.scratch_dir) / "rendezvous" / str(job_id)


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def tiny_ready():
    """The tiny target and conversations under outputs/tiny (built once, reused; the examples use them)."""
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "modelopt_ext.targets.tiny",
            "--out",
            str(REPO / "outputs/tiny/target"),
            "--data",
            str(REPO / "outputs/tiny/conversations.jsonl"),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=900,
    )


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.timeout(2400)
def test_streaming_pipeline_with_vllm_on_three_nodes(slurm_cluster, tmp_path, monkeypatch, tiny_ready):
    job_dir = _on_cluster(monkeypatch, slurm_cluster, tmp_path)
    t0 = time.monotonic()
    t0_wall = time.time()
    res = run_job(
        EXAMPLE,
        ["pipeline.task_3.environment=[{BENCH_PROMPTS: '4'}, {BENCH_NEW_TOKENS: '24'}]"],
        mode="submit",
        job_dir=job_dir,
        run_id="e2e",
        echo=print,
        poll_s=1.0,
    )
    wall = time.monotonic() - t0
    states = {t.name: (t.state, t.exit_code, t.reason) for t in res.tasks}
    logs = {t.name: _read_logs(t) for t in res.tasks}
    assert res.ok, f"{states}\n--- task_1 log tail ---\n{logs['task_1'][-6000:]}"
    assert all(t.state == "COMPLETED" for t in res.tasks), states

    phases = _phases(res.tasks, t0_wall)
    record_timing(
        "e2e pipeline (vLLM, 3 nodes): "
        + ", ".join(f"{k} {v:.0f}s" for k, v in phases.items())
        + f"; launcher wall {wall:.0f}s"
    )

    train_log = logs["task_1"]
    # vLLM served the hidden states: its log exists in the rendezvous folder and the trainers streamed.
    rdv = _rdv_dir(res, res.tasks[1].job_id)
    assert (rdv / "logs" / "vllm.0.log").is_file()
    assert (rdv / "done").is_file() and not (rdv / "failed").exists()
    assert "mode streaming" in train_log
    # ONE DDP job across both trainer nodes.
    assert "trainer 0/2" in train_log and "trainer 1/2" in train_log
    assert "2 rank(s)" in train_log
    out = Path(res.scratch_dir) / "eagle3"
    ckpt = max(out.glob("epoch_*_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[-1]))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_step"] == 24
    # The export loads; the benchmark printed an acceptance length.
    assert "export check:" in logs["task_2"] and "loads as Eagle3DraftModel" in logs["task_2"]
    m = re.search(r"mean acceptance length: ([0-9.]+)", logs["task_3"])
    assert m and float(m.group(1)) >= 1.0, logs["task_3"][-3000:]
    # Measured three ways side by side (the engine: vLLM's CPU build on the benchmark node) and gated.
    for src in (
        r"trainer simulation, step 24",
        r"specdec_bench, conversations.jsonl \(4 prompts\)",
        r"vLLM [0-9.]+ cpu, 4 prompts",
    ):  # BENCH_PROMPTS=4 above
        assert re.search(rf"acceptance length \({src}.*\): [0-9.]+", logs["task_3"]), logs["task_3"][-3000:]
    assert "gate passed: vLLM" in logs["task_3"], logs["task_3"][-3000:]
    assert "python -m modelopt_ext.serve_vllm" in logs["task_3"]


@pytest.mark.timeout(1200)
def test_segment_plan_and_rendezvous_on_2411(slurm_cluster_2411, tmp_path, monkeypatch, tiny_ready):
    job_dir = _on_cluster(monkeypatch, slurm_cluster_2411, tmp_path)
    out = tmp_path / "out"
    spec = _write_spec(
        tmp_path,
        "seg",
        _train_only_spec(out, nodes=4, serve_nodes=2, segment=2, max_steps=4, save_interval=4),
    )
    t0 = time.monotonic()
    res = run_job(spec, [], mode="submit", job_dir=job_dir, run_id="seg", echo=print, poll_s=1.0)
    wall = time.monotonic() - t0
    task = res.tasks[0]
    log = _read_logs(task)
    assert res.ok, f"{task.state} {task.exit_code} {task.reason}\n{log[-6000:]}"
    record_timing(
        f"e2e 24.11 segment=2 (serve_target, 4 nodes): job {_runtime_s(slurm_cluster_2411, task.job_id)}s; "
        f"launcher wall {wall:.0f}s"
    )
    rdv = _rdv_dir(res, task.job_id)
    assert task.env["SERVE_NODE_IDS"] == "0,2" and task.env["TRAIN_NODE_IDS"] == "1,3"
    urls = {i: (rdv / f"server.{i}").read_text().strip() for i in (0, 2)}
    # Each trainer lists the server of its own segment first.
    assert f"[node 1] servers (preferred first): {urls[0]},{urls[2]}" in log
    assert f"[node 3] servers (preferred first): {urls[2]},{urls[0]}" in log
    # Each trainer passes its preference order as it is; Python (server_pool.first_server) starts each
    # node's first rank at the first URL, so both ranks use the server of their own segment.
    assert log.count(f"data.server_urls=[{urls[0]},{urls[2]}]") == 1, log[-6000:]
    assert log.count(f"data.server_urls=[{urls[2]},{urls[0]}]") == 1, log[-6000:]
    assert f"data: rank 0 (local rank 0) prefers serve_target {urls[0]} (data.server_urls[0] of 2)" in log
    assert f"data: rank 1 (local rank 0) prefers serve_target {urls[2]} (data.server_urls[0] of 2)" in log
    assert "trainer 0/2" in log and "trainer 1/2" in log
    assert (out / "export" / "config.json").is_file() and (rdv / "done").is_file()


def _submit_detached(tmp_path, name, spec: dict):
    """Submit a one-task spec without following it (the test watches the job itself)."""
    path = _write_spec(tmp_path, name, spec)
    return run_job(path, [], mode="submit", job_dir=tmp_path / "jobs", run_id=name, echo=print, detach=True)


def _launch_fault_job(tmp_path, name, out, *, max_steps, extra_args=()):
    spec = _train_only_spec(out, nodes=3, max_steps=max_steps, save_interval=4, extra_args=extra_args)
    return _submit_detached(tmp_path, name, spec)


def _descendants(pid: int) -> list[int]:
    """Live descendants of pid (by parent links in /proc)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        kids = [p for p, pp in parent.items() if pp == cur]
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill_midway_and_time_stop(cluster, res, pid_file: str, out: Path, only: str | None = None):
    """Once a checkpoint exists, SIGKILL the process named in the rendezvous pid file (with `only`: its
    descendants whose command line contains it, e.g. the training rank); return the seconds until Slurm
    reports the job finished, and its state."""
    job_id = res.tasks[0].job_id
    rdv = _rdv_dir(res, job_id)
    _wait_for(lambda: list(out.glob("epoch_*_step_*")), 900, "the first checkpoint")
    pid = int((rdv / pid_file).read_text().strip())
    if only:
        victims = [p for p in _descendants(pid) if only in _cmdline(p)]
        assert victims, f"no process matching {only!r} under pid {pid}"
    else:
        victims = [pid]
    for v in victims:
        os.kill(v, signal.SIGKILL)
    killed = time.monotonic()
    result = cluster.wait_job(int(job_id), timeout=240, poll_s=0.5)
    return time.monotonic() - killed, result.state


@pytest.mark.timeout(1200)
def test_killed_server_stops_every_node(slurm_cluster, tmp_path, monkeypatch, tiny_ready):
    _on_cluster(monkeypatch, slurm_cluster, tmp_path)
    out = tmp_path / "out"
    res = _launch_fault_job(tmp_path, "kill-server", out, max_steps=400)
    stop_s, state = _kill_midway_and_time_stop(slurm_cluster, res, "server.0.pid", out)
    record_timing(f"fault: server killed -> job {state} in {stop_s:.1f}s")
    assert state == "FAILED"
    assert stop_s < 120
    rdv = _rdv_dir(res, res.tasks[0].job_id)
    reason = (rdv / "failed").read_text()
    assert "server on node 0 exited" in reason, reason
    assert slurm_cluster.job_ids() == set() or int(res.tasks[0].job_id) not in slurm_cluster.job_ids()
    log = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "jobs").rglob("log-*.out"))
    # Every node ended through its trap, naming the job's failure (whether the failed marker or srun's
    # --kill-on-bad-exit SIGTERM reached it first).
    for node in (0, 1, 2):
        assert f"[node {node}] exiting with" in log, log[-5000:]


@pytest.mark.timeout(1800)
def test_killed_trainer_stops_the_job_and_resume_continues(slurm_cluster, tmp_path, monkeypatch, tiny_ready):
    _on_cluster(monkeypatch, slurm_cluster, tmp_path)
    out = tmp_path / "out"
    res = _launch_fault_job(tmp_path, "kill-trainer", out, max_steps=24)
    stop_s, state = _kill_midway_and_time_stop(
        slurm_cluster, res, "trainer.2.pid", out, only="modelopt_ext.train"
    )
    record_timing(f"fault: trainer killed -> job {state} in {stop_s:.1f}s")
    assert state == "FAILED" and stop_s < 120
    reason = (_rdv_dir(res, res.tasks[0].job_id) / "failed").read_text()
    # The killed rank's node, or its peer (its collective broke), reports first: either names training.
    assert re.search(r"training on node [12] exited", reason), reason
    done = sorted(out.glob("epoch_*_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[-1]))
    last_step = int(done[-1].name.rsplit("_", 1)[-1])
    assert last_step < 24

    res2 = run_job(
        _write_spec(
            tmp_path,
            "resume",
            _train_only_spec(out, nodes=3, max_steps=24, save_interval=4, extra_args=["--resume auto"]),
        ),
        [],
        mode="submit",
        job_dir=tmp_path / "jobs",
        run_id="resume",
        echo=print,
        poll_s=1.0,
    )
    log = _read_logs(res2.tasks[0])
    assert res2.ok, log[-6000:]
    assert "(restored from the checkpoint)" in log
    # The resumed run started at the checkpoint's step: it ran exactly the remaining steps.
    assert f"{24 - last_step} steps this run (global step 24/24)" in log, log[-3000:]
    assert (out / "export" / "config.json").is_file()


def _steps_logged(out: Path) -> list[int]:
    """The global steps of every progress record in metrics.jsonl (all attempts, in order)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


@pytest.mark.timeout(1800)
def test_requeued_training_job_resumes_from_its_last_checkpoint(
    slurm_cluster, tmp_path, monkeypatch, tiny_ready
):
    """`scontrol requeue` of a running training job (what a preemption does): the requeued attempt resumes
    from the last complete checkpoint by itself (no --resume in the spec), ends at max_steps, and trains
    no step before that checkpoint twice."""
    _on_cluster(monkeypatch, slurm_cluster, tmp_path)
    out = tmp_path / "out"
    max_steps = 80  # far more than the first attempt runs before the requeue lands
    spec = _train_only_spec(out, nodes=3, max_steps=max_steps, save_interval=4)
    spec["pipeline"]["task_0"]["slurm_config"]["requeue"] = True
    res = _submit_detached(tmp_path, "requeue", spec)
    job_id = int(res.tasks[0].job_id)
    rdv = _rdv_dir(res, job_id)
    _wait_for(lambda: (out / "epoch_0_step_4" / "trainer_state.json").is_file(), 900, "the first checkpoint")
    slurm_cluster.run("scontrol", "requeue", str(job_id))
    requeued = time.monotonic()
    # Slurm holds a requeued job back (BeginTime, ~2 min here); let it start as soon as it is pending again.
    _wait_for(
        lambda: slurm_cluster.job_record(job_id).get("JobState") == "PENDING", 300, "the job to be pending"
    )
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
    # The first attempt ends; everything it checkpointed is there before the second attempt starts.
    rdv2 = rdv.with_name(f"{job_id}.r1")
    _wait_for(lambda: rdv2.is_dir(), 600, "the requeued attempt's rendezvous folder")
    restart_s = time.monotonic() - requeued
    result = slurm_cluster.wait_job(job_id, timeout=900, poll_s=1.0)
    log = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "jobs").rglob("log-*.out"))
    assert result.state == "COMPLETED", f"{result.state} {result.exit_code}\n{log[-6000:]}"
    assert result.record.get("Restarts") == "1", result.record
    resumed = re.findall(r"resume: from \S*/epoch_0_step_(\d+) ", log)
    assert resumed, log[-6000:]
    from_step = int(resumed[-1])
    assert from_step >= 4
    assert f"{max_steps - from_step} steps this run (global step {max_steps}/{max_steps})" in log, log[-3000:]
    state = json.loads(
        (
            max(out.glob("epoch_*_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[-1]))
            / "trainer_state.json"
        ).read_text()
    )
    assert state["global_step"] == max_steps
    steps = _steps_logged(out)
    before = [s for s in steps if s <= from_step]
    assert len(before) == len(set(before)), f"a step up to {from_step} was trained twice: {steps}"
    assert steps[-1] == max_steps
    assert (out / "export" / "config.json").is_file() and (rdv2 / "done").is_file()
    record_timing(
        f"requeue: second attempt's rendezvous {restart_s:.0f}s after `scontrol requeue`; resumed from step {from_step}"
    )


def _last_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return steps[-1] if steps else 0


def _node_script_pid(server_pid: int) -> int:
    """The entry script that started a server (setsid does not fork: the server's parent)."""
    return int(Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.timeout(2400)
def test_job_survives_a_lost_server_and_a_lost_serve_node(slurm_cluster, tmp_path, monkeypatch, tiny_ready):
    """2 serve nodes (serve_target) + 1 trainer node. Kill server 0's process mid-run: its node restarts it
    (logged, address re-published) while the trainer carries on with server 1, then returns to it. Then kill
    serve node 1's whole node script and its server: training completes on server 0, the export exists and the
    job ends COMPLETED."""
    _on_cluster(monkeypatch, slurm_cluster, tmp_path)
    out = tmp_path / "out"
    max_steps = 300
    spec = _train_only_spec(
        out,
        nodes=3,
        serve_nodes=2,
        max_steps=max_steps,
        save_interval=100,
        extra_env={"SERVE_RESTART_BACKOFF_S": "1"},
    )
    res = _submit_detached(tmp_path, "survive", spec)
    job_id = int(res.tasks[0].job_id)
    rdv = _rdv_dir(res, job_id)
    logs = lambda: "\n".join(p.read_text(errors="replace") for p in (tmp_path / "jobs").rglob("log-*.out"))
    _wait_for(lambda: _last_step(out) >= 10, 900, "10 training steps")
    t0, s0 = time.monotonic(), _last_step(out)
    time.sleep(5)
    before = (_last_step(out) - s0) / (time.monotonic() - t0)

    server0 = int((rdv / "server.0.pid").read_text())
    os.kill(server0, signal.SIGKILL)
    killed, s_kill = time.monotonic(), _last_step(out)
    _wait_for(lambda: _last_step(out) > s_kill + 2, 300, "training to go on after the kill")
    routed_s = time.monotonic() - killed
    _wait_for(lambda: "server restarted:" in logs(), 600, "the restart of server 0")
    restarted_s = time.monotonic() - killed
    during = (_last_step(out) - s_kill) / restarted_s
    assert int((rdv / "server.0.pid").read_text()) != server0
    assert (rdv / "server.0.restarts").read_text().strip() == "1"

    server1 = int((rdv / "server.1.pid").read_text())
    script1 = _node_script_pid(server1)
    assert "train_eagle_streaming.sh" in _cmdline(script1), _cmdline(script1)
    os.kill(script1, signal.SIGKILL)
    os.killpg(server1, signal.SIGKILL)
    s_kill1 = _last_step(out)
    _wait_for(lambda: (rdv / "done").is_file() or (rdv / "failed").is_file(), 1500, "the end of the job")
    result = slurm_cluster.wait_job(job_id, timeout=300, poll_s=1.0)
    log = logs()
    assert (rdv / "done").is_file(), (
        f"{(rdv / 'failed').read_text() if (rdv / 'failed').exists() else ''}\n{log[-6000:]}"
    )
    assert not (rdv / "failed").exists()
    assert (out / "export" / "config.json").is_file()
    assert f"global step {max_steps}/{max_steps}" in log
    assert _last_step(out) > s_kill1
    # The log names the outage and the restart; the trainer's summary counts the outages per server.
    assert "[node 0] outage: the target hidden-state server on node 0 exited with code" in log
    assert "[node 0] restart 1/3 of the target server on node 0" in log
    assert "[node 0] server restarted: http://" in log
    assert "[node 2] hidden-state server restarts during the job: node 0: 1 restart(s)" in log
    summary = (out / "summary.txt").read_text()
    assert re.search(r"server \S+: .*[1-9]\d* outage", summary), summary
    # ... and the serve nodes' side of it lands in the run's report too.
    assert "hidden-state server restarts during the job: node 0: 1 restart(s)" in summary, summary
    serve_nodes = json.loads((out / "metrics.json").read_text())["serve_nodes"]
    assert serve_nodes["0"] == {"restarts": 1, "down": None}, serve_nodes
    # Nodes 0 and 2 ended cleanly; node 1's node_exec outlived its killed script and ended cleanly once the
    # job was done, so Slurm records the job as COMPLETED (dependent tasks run) although a serve node was lost.
    assert "[node 0] node 0 finished" in log and "[node 2] node 2 finished" in log
    assert "[node 1] this serve node's script ended with code 137; the job goes on" in log, log[-6000:]
    assert "[node 1] the job finished without this serve node (done marker)" in log
    assert result.state == "COMPLETED", f"{result.state}\n{log[-6000:]}"
    record_timing(
        f"survives (serve_target, 2 serve + 1 trainer): steps/s before {before:.2f}, during the outage "
        f"{during:.2f}; training went on {routed_s:.1f}s after the kill; server restarted and healthy "
        f"{restarted_s:.1f}s after the kill; after serve node 1 was killed the job ended {result.state}"
    )


# A cluster of its own (own namespaces, addresses and hosts lines), so that losing a whole node does not
# disturb the shared one, with slurmctld calling a silent node DOWN after 10 s instead of Slurm's 300 s.
HOST_LOSS_CLUSTER = "hl22"


@pytest.fixture
def host_loss_cluster(slurm_2205_installed):
    short = Path(tempfile.mkdtemp(prefix="hl22-", dir="/tmp"))  # munge's socket path must stay short
    state_dir = short / "state"
    proc = cluster_sh(
        "up", "--version", "22.05", "--name", HOST_LOSS_CLUSTER, "--nodes", "3", "--state-dir", str(state_dir),
        "--slurmd-timeout", "10", "--timeout", "120", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    try:
        yield SlurmCluster.from_state_dir(state_dir)
    finally:
        inodes = namespace_inodes(HOST_LOSS_CLUSTER)
        proc = cluster_sh(
            "down", "--version", "22.05", "--name", HOST_LOSS_CLUSTER, "--state-dir", str(state_dir), timeout=300
        )
        shutil.rmtree(short, ignore_errors=True)
        assert proc.returncode == 0, proc.stderr
        assert leftovers(HOST_LOSS_CLUSTER, None, inodes) == []


def _node_state(cluster: SlurmCluster, node: str) -> str:
    proc = cluster.run("scontrol", "show", "node", node, check=False)
    found = re.search(r"State=(\S+)", proc.stdout)
    return found.group(1) if found else ""


@pytest.mark.timeout(1800)
def test_job_survives_the_loss_of_a_whole_serve_host(host_loss_cluster, tmp_path, monkeypatch, tiny_ready):
    """2 serve nodes + 1 trainer node. Every process of serve node 1's host dies at once (its slurmd, the job
    step, the entry script, the server: what a power loss leaves). Training goes on with server 0; slurmctld
    calls the node DOWN; the job (sbatch/srun --no-kill) finishes training, exports and ends COMPLETED."""
    cluster = host_loss_cluster
    _on_cluster(monkeypatch, cluster, tmp_path)
    out = tmp_path / "out"
    max_steps = 300
    spec = _train_only_spec(out, nodes=3, serve_nodes=2, max_steps=max_steps, save_interval=100)
    res = _submit_detached(tmp_path, "hostloss", spec)
    job_id = int(res.tasks[0].job_id)
    rdv = _rdv_dir(res, job_id)
    logs = lambda: "\n".join(p.read_text(errors="replace") for p in (tmp_path / "jobs").rglob("log-*.out"))
    _wait_for(lambda: _last_step(out) >= 10, 900, "10 training steps")
    t0, s0 = time.monotonic(), _last_step(out)
    time.sleep(5)
    before = (_last_step(out) - s0) / (time.monotonic() - t0)

    server1 = int((rdv / "server.1.pid").read_text())
    env = dict(
        item.split("=", 1) for item in Path(f"/proc/{server1}/environ").read_bytes().decode().split("\0") if "=" in item
    )
    host = env["SLURMD_NODENAME"]
    victims = processes_in_namespaces({os.stat(f"/proc/{server1}/ns/net").st_ino})
    assert server1 in victims and len(victims) >= 3, victims  # slurmd, the step, the script, the server
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    killed, s_kill = time.monotonic(), _last_step(out)
    _wait_for(lambda: _last_step(out) > s_kill + 2, 300, "training to go on after the host died")
    routed_s = time.monotonic() - killed
    _wait_for(lambda: "DOWN" in _node_state(cluster, host), 300, f"slurmctld to call {host} DOWN")
    down_s = time.monotonic() - killed
    # Without --no-kill Slurm ends the job here (NODE_FAIL) and requeues it, to wait for the DOWN node.
    result = cluster.wait_job(job_id, timeout=600, poll_s=1.0)
    log = logs()
    assert (rdv / "done").is_file(), (
        f"{result.state}; {(rdv / 'failed').read_text() if (rdv / 'failed').exists() else ''}\n{log[-6000:]}"
    )
    assert (out / "export" / "config.json").is_file()
    assert f"global step {max_steps}/{max_steps}" in log
    assert result.state == "COMPLETED", f"{result.state}\n{log[-6000:]}"
    record_timing(
        f"survives (whole serve host lost, 2 serve + 1 trainer): steps/s before {before:.2f}; training went on "
        f"{routed_s:.1f}s after the host died; slurmctld called it DOWN after {down_s:.1f}s; "
        f"the job ended {result.state}"
    )


@pytest.mark.timeout(2400)
def test_job_with_vllm_servers_survives_a_lost_server(slurm_cluster, tmp_path, monkeypatch, tiny_ready):
    """The vLLM variant: 2 serve nodes with real vLLM CPU hidden-state servers + 1 trainer node (streaming,
    2 DataLoader workers). Server 0 (its CLI and vLLM's processes) is SIGKILLed mid-run: its node logs the
    outage and restarts it, the trainer streams from server 1 meanwhile, and the job completes and exports."""
    _on_cluster(monkeypatch, slurm_cluster, tmp_path)
    out = tmp_path / "out"
    max_steps = 40
    spec = _train_only_spec(out, nodes=3, serve_nodes=2, max_steps=max_steps, save_interval=20)
    task = spec["pipeline"]["task_0"]
    task["environment"] = [
        e for e in task["environment"] if not {"SERVE_ENGINE", "STREAMING_NUM_WORKERS"} & set(e)
    ] + [{"SERVE_ENGINE": "vllm"}, {"STREAMING_NUM_WORKERS": "2"}, {"SERVE_RESTART_BACKOFF_S": "1"}]
    res = _submit_detached(tmp_path, "survive-vllm", spec)
    job_id = int(res.tasks[0].job_id)
    rdv = _rdv_dir(res, job_id)
    _wait_for(lambda: _last_step(out) >= 6, 1500, "6 training steps (both vLLM servers up)")
    t0, s0 = time.monotonic(), _last_step(out)
    time.sleep(4)
    before = (_last_step(out) - s0) / (time.monotonic() - t0)
    server0 = int((rdv / "server.0.pid").read_text())
    victims = [server0, *_descendants(server0)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    killed, s_kill = time.monotonic(), _last_step(out)
    _wait_for(lambda: _last_step(out) > s_kill + 2, 600, "training to go on after the kill")
    routed_s = time.monotonic() - killed
    during = (_last_step(out) - s_kill) / routed_s
    result = slurm_cluster.wait_job(job_id, timeout=1500, poll_s=1.0)
    log = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "jobs").rglob("log-*.out"))
    assert result.state == "COMPLETED", f"{result.state}\n{log[-6000:]}"
    assert (rdv / "done").is_file() and (out / "export" / "config.json").is_file()
    assert f"global step {max_steps}/{max_steps}" in log
    assert "[node 0] outage: the vllm hidden-state server on node 0 exited with code" in log
    assert "[node 0] restart 1/3 of the vllm server on node 0" in log
    record_timing(
        f"survives (vLLM, 2 serve + 1 trainer): steps/s before {before:.2f}, after the kill {during:.2f}; "
        f"training went on {routed_s:.1f}s after the kill; restart completed: "
        f"{'yes' if 'server restarted:' in log else 'no (the job ended first)'}"
    )
