"""`launch.py --dryrun --measured RUN/metrics.json`: the sizing rule applied to a spec's plan, torch-free."""

from __future__ import annotations

import os

from modelopt_ext.telemetry.sizing import MeasuredRates, size_for_plan
from modelopt_ext.telemetry.summary import write_metrics_json

KIMI = "examples/moonshotai/Kimi-K2.5/hf_streaming_eagle3_multi_node.yaml"


def _metrics(tmp_path, *, supply, demand, servers, ranks, starved):
    """A streamed run's metrics.json as the trainer writes it (the real writer; only the figures the rule reads
    differ from run to run)."""
    path = tmp_path / "metrics.json"
    write_metrics_json(
        path,
        {
            "source": "prefetched",
            "servers": {f"http://node{i}:8000": {"requests": 10} for i in range(servers)},
            "world_size": ranks,
            "supply_tokens_per_s": supply,
            "demand_tokens_per_s": demand,
            "starved": starved,
            "data_wait_frac": 0.5 if starved else 0.01,
        },
    )
    return path


def _env(tmp_path):
    env = {**os.environ, "MODELOPT_JOB_DIR": str(tmp_path / "jobs"), "HOME": str(tmp_path)}
    env.pop("NEMORUN_HOME", None)
    return env


def test_dryrun_prints_serve_nodes_for_the_plan_without_torch(tmp_path, cli_reporting_torch):
    # A starved 2-server x 16-rank run: 40k tok/s per server, 10k per rank. Kimi's spec: 2 train nodes x 4 GPUs
    # -> 8 ranks need ceil(8 * 10k * 1.1 / 40k) = 3 servers; it plans 2.
    m = _metrics(tmp_path, supply=80_000, demand=160_000, servers=2, ranks=16, starved=True)
    p = cli_reporting_torch(["--yaml", KIMI, "--dryrun", "--measured", str(m), "--run-id", "s1"], _env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "TORCH_IMPORTED=False" in p.stdout
    assert "supply 40,000 tok/s per server (saturated" in p.stdout
    assert "[task_1] sizing: 3 serve node(s) keep 2 train node(s) x 4 rank(s) fed" in p.stdout
    assert "the spec plans 2: too few" in p.stdout
    assert "serve_nodes=3 (1 train node(s))" in p.stdout


def test_a_run_that_kept_up_gives_an_upper_bound_and_enough(tmp_path, cli_reporting_torch):
    # Not starved: its servers idled, so supply is a lower bound and the advice is capped by what kept up
    # (2 servers for 16 ranks -> 1 for Kimi's 8 ranks).
    m = _metrics(tmp_path, supply=20_000, demand=160_000, servers=2, ranks=16, starved=False)
    p = cli_reporting_torch(["--yaml", KIMI, "--dryrun", "--measured", str(m), "--run-id", "s2"], _env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "a lower bound: the run kept up" in p.stdout
    assert "[task_1] sizing: at most 1 serve node(s) keep 2 train node(s)" in p.stdout
    assert "the spec plans 2: enough" in p.stdout


def test_bad_measured_file_is_one_line_exit_2(tmp_path, cli_reporting_torch):
    env = _env(tmp_path)
    bad = tmp_path / "bad.json"
    for content, fragment in [
        (None, "cannot read a metrics.json"),
        ("{not json", "cannot read a metrics.json"),
        ("[1, 2]", "not a metrics.json"),
        ('{"source": "in-process", "world_size": 1}', "no server supply/demand figures"),
    ]:
        if content is not None:
            bad.write_text(content)
        p = cli_reporting_torch(["--yaml", KIMI, "--dryrun", "--measured", str(bad)], env)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, p.stderr
        assert lines[0].startswith(f"error: --measured {bad}: ") and fragment in lines[0], p.stderr
    p = cli_reporting_torch(["--yaml", KIMI, "--measured", str(bad)], env)
    assert p.returncode == 2 and "--measured goes with --dryrun" in p.stderr


def test_size_for_plan_scales_the_measured_cap():
    kept_up = MeasuredRates(supply_per_server=100.0, demand_per_rank=100.0, servers=4, ranks=4, saturated=False)
    # Lower-bound supply says 1.1 servers per rank, but 4 servers demonstrably fed 4 ranks: cap 1 per rank.
    assert size_for_plan(kept_up, 8).servers_needed == 8
    saturated = MeasuredRates(100.0, 100.0, 4, 4, saturated=True)
    assert size_for_plan(saturated, 8).servers_needed == 9  # ceil(8 * 1.1)
