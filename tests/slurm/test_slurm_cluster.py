"""The local Slurm clusters themselves: real multi-node jobs, per-node addresses, block topology."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
from slurm_testlib import SlurmCluster, record_timing

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

# Every task binds the same port (own port space per node), reports itself, then waits until all nodes
# have reported, so the binds really overlap in time.
NODE_REPORT = textwrap.dedent(
    """\
    #!/bin/bash
    #SBATCH --time=2
    set -euo pipefail
    srun python3 - "$@" <<'EOF'
    import os, pathlib, socket, sys, time
    out = pathlib.Path(sys.argv[1])
    node_id = os.environ["SLURM_NODEID"]
    s = socket.socket()
    s.bind(("0.0.0.0", 29500))
    s.listen()
    addrs = os.popen("hostname -I").read().split()
    (out / f"{node_id}.tmp").write_text(f"{node_id} {socket.gethostname()} {' '.join(addrs)}\\n")
    os.rename(out / f"{node_id}.tmp", out / f"{node_id}.txt")
    deadline = time.time() + 30
    while len(list(out.glob("*.txt"))) < int(os.environ["SLURM_NNODES"]) and time.time() < deadline:
        time.sleep(0.05)
    EOF
    """
)


def write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def read_reports(out: Path) -> dict[int, tuple[str, list[str]]]:
    reports = {}
    for file in out.glob("*.txt"):
        node_id, host, *addrs = file.read_text().split()
        reports[int(node_id)] = (host, addrs)
    return reports


def test_three_node_job_runs_on_every_node_with_its_own_address(slurm_cluster: SlurmCluster, tmp_path: Path):
    out = tmp_path / "reports"
    out.mkdir()
    script = write_script(tmp_path / "job.sh", NODE_REPORT)
    result = slurm_cluster.submit_and_wait(
        script, "-N", "3", "-o", str(tmp_path / "job.log"), script_args=[str(out)], cwd=tmp_path
    )
    record_timing(f"slurm 22.05: 3-node job (python on every node) submit-to-finish {result.elapsed_s:.2f}s")
    assert result.state == "COMPLETED", (result, (tmp_path / "job.log").read_text())
    reports = read_reports(out)
    assert sorted(reports) == [0, 1, 2]
    assert [reports[i][0] for i in range(3)] == slurm_cluster.nodes[:3]
    # Each node has exactly its own address from the cluster's private range, none shared.
    assert [reports[i][1] for i in range(3)] == [[ip] for ip in slurm_cluster.node_ips[:3]]


def test_trivial_three_node_job_turnaround(slurm_cluster: SlurmCluster, tmp_path: Path):
    script = write_script(tmp_path / "job.sh", "#!/bin/bash\nsrun true\n")
    result = slurm_cluster.submit_and_wait(script, "-N", "3", "-o", str(tmp_path / "job.log"), cwd=tmp_path)
    record_timing(f"slurm 22.05: trivial 3-node job submit-to-finish {result.elapsed_s:.2f}s")
    assert result.state == "COMPLETED"
    assert result.record["NodeList"] == f"{slurm_cluster.cluster_id}n[1-3]"


def test_slurm_2205_rejects_segment(slurm_cluster: SlurmCluster, tmp_path: Path):
    """Why 24.11 exists here at all: 22.05 does not know --segment."""
    script = write_script(tmp_path / "job.sh", "#!/bin/bash\ntrue\n")
    before = slurm_cluster.job_ids()
    proc = slurm_cluster.run("sbatch", "-N", "2", "--segment=1", str(script), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "segment" in proc.stderr
    assert slurm_cluster.job_ids() <= before


def test_segment_of_two_over_four_nodes_runs(slurm_cluster_2411: SlurmCluster, tmp_path: Path):
    out = tmp_path / "reports"
    out.mkdir()
    script = write_script(tmp_path / "job.sh", NODE_REPORT)
    result = slurm_cluster_2411.submit_and_wait(
        script,
        "-N",
        "4",
        "--segment=2",
        "-o",
        str(tmp_path / "job.log"),
        script_args=[str(out)],
        cwd=tmp_path,
    )
    record_timing(f"slurm 24.11: 4-node --segment=2 job submit-to-finish {result.elapsed_s:.2f}s")
    assert result.state == "COMPLETED", (result, (tmp_path / "job.log").read_text())
    reports = read_reports(out)
    assert sorted(reports) == [0, 1, 2, 3]
    assert [reports[i][1] for i in range(4)] == [[ip] for ip in slurm_cluster_2411.node_ips]


def test_topology_reports_blocks_of_two(slurm_cluster_2411: SlurmCluster):
    out = slurm_cluster_2411.run("scontrol", "show", "topology").stdout
    n = slurm_cluster_2411.nodes
    assert f"Nodes={n[0]},{n[1]} BlockSize=2" in out
    assert f"Nodes={n[2]},{n[3]} BlockSize=2" in out


@pytest.mark.parametrize("nodes,segment", [(4, 4), (4, 3), (3, 2)])
def test_impossible_segment_is_refused_by_slurm(
    slurm_cluster_2411: SlurmCluster, tmp_path: Path, nodes: int, segment: int
):
    script = write_script(tmp_path / "job.sh", "#!/bin/bash\ntrue\n")
    before = slurm_cluster_2411.job_ids()
    proc = slurm_cluster_2411.run(
        "sbatch", "-N", str(nodes), f"--segment={segment}", str(script), cwd=tmp_path, check=False
    )
    assert proc.returncode == 1, proc
    assert "Requested topology configuration is not available" in proc.stderr
    assert slurm_cluster_2411.job_ids() <= before


def test_wrappers_keep_arguments_and_working_directory(slurm_cluster: SlurmCluster, tmp_path: Path):
    write_script(tmp_path / "job.sh", '#!/bin/bash\nprintf "%s\\n" "$PWD" "$@" > args.txt\n')
    name = "two words 'q'"
    args = ["arg  one", 'it"s', "$HOME"]
    # A relative script path and a relative output file: both resolve in the caller's directory.
    job_id = slurm_cluster.sbatch(
        "job.sh", "--job-name", name, "-o", "job.log", script_args=args, cwd=tmp_path
    )
    assert slurm_cluster.wait_job(job_id, timeout=60).state == "COMPLETED"
    assert (tmp_path / "args.txt").read_text().splitlines() == [str(tmp_path), *args]
    assert f"JobName={name} " in slurm_cluster.run("scontrol", "-o", "show", "job", str(job_id)).stdout


def test_2411_wrappers_refuse_to_submit_from_a_folder_the_chroot_cannot_see(slurm_cluster_2411: SlurmCluster):
    proc = slurm_cluster_2411.run("sbatch", "--wrap", "true", cwd="/var", check=False)
    assert proc.returncode == 1
    assert "not visible inside the slurm chroot" in proc.stderr
    # Commands that do not run work somewhere still answer from there.
    assert slurm_cluster_2411.run("sinfo", "-h", "-o", "%D", cwd="/var").stdout.split() == ["4"]


GLOO_JOB = textwrap.dedent(
    """\
    #!/bin/bash
    #SBATCH --time=5
    set -euo pipefail
    master="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    srun python - "$1" "$master" <<'EOF'
    import os, pathlib, sys, torch, torch.distributed as dist
    out, master = pathlib.Path(sys.argv[1]), sys.argv[2]
    rank, world = int(os.environ["SLURM_NODEID"]), int(os.environ["SLURM_NNODES"])
    dist.init_process_group("gloo", init_method=f"tcp://{master}:29500", rank=rank, world_size=world)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    (out / f"{rank}.txt").write_text(f"{t.item()}\\n")
    dist.destroy_process_group()
    EOF
    """
)


def test_gloo_all_reduce_across_three_nodes(slurm_cluster: SlurmCluster, tmp_path: Path):
    """torch.distributed rendezvous over the nodes' own addresses (what multi-node training uses)."""
    out = tmp_path / "ranks"
    out.mkdir()
    script = write_script(tmp_path / "job.sh", GLOO_JOB)
    result = slurm_cluster.submit_and_wait(
        script, "-N", "3", "-o", str(tmp_path / "job.log"), script_args=[str(out)], cwd=tmp_path, timeout=300
    )
    record_timing(f"slurm 22.05: 3-node gloo all_reduce job submit-to-finish {result.elapsed_s:.1f}s")
    assert result.state == "COMPLETED", (result, (tmp_path / "job.log").read_text())
    assert {p.name: p.read_text().strip() for p in out.iterdir()} == {f"{r}.txt": "6.0" for r in range(3)}


def test_generated_wrappers_are_shellcheck_clean(
    slurm_cluster: SlurmCluster, slurm_cluster_2411: SlurmCluster
):
    wrappers = sorted(str(p) for c in (slurm_cluster, slurm_cluster_2411) for p in c.bin_dir.iterdir())
    assert len(wrappers) == 16
    proc = subprocess.run(["shellcheck", *wrappers], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
