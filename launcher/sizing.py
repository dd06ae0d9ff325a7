"""Sizing advice at dry-run time: `launch.py --yaml JOB.yaml --dryrun --measured RUN/metrics.json`.

A finished training run's metrics.json holds what its hidden-state servers supplied and what its trainer ranks
could consume. The rule (`modelopt_ext.telemetry.sizing`, its one owner) turns those rates into the serve nodes
each streaming task of this spec needs for its trainer nodes, next to what the spec plans. One server runs
per serve node (the entry script's shape); trainer ranks per node are TRAIN_PROCS_PER_NODE, else the task's
GPUs per node, else 1 (the entry script's rule). Torch-free: this runs on a login node.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelopt_ext.telemetry.sizing import rates_from_metrics, size_for_plan
from modelopt_ext.util.errors import ConfigError


def load_rates(path: str | Path):
    """The measured rates in a run's metrics.json; ConfigError (one line naming the file) when unusable."""
    p = Path(path)
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError([f"--measured {p}: cannot read a metrics.json ({e.__class__.__name__}: {e})"]) from None
    if not isinstance(m, dict):
        raise ConfigError([f"--measured {p}: not a metrics.json (expected a JSON object)"])
    rates = rates_from_metrics(m, saturated=bool(m.get("starved")))
    if rates is None:
        raise ConfigError(
            [f"--measured {p}: no server supply/demand figures (a run streamed from hidden-state servers has them)"]
        )
    return rates


def _ranks_per_node(task) -> int:
    procs = str(task.env.get("TRAIN_PROCS_PER_NODE", "")).strip()
    if procs.isdigit() and int(procs) > 0:
        return int(procs)
    return task.plan.gpus_per_node or 1


def _best_split(rates, nodes: int, per_node: int) -> int | None:
    """The fewest serve nodes among `nodes` that keep the rest (as train nodes) fed; None if no split does."""
    for serve in range(1, nodes):
        if serve >= size_for_plan(rates, (nodes - serve) * per_node).servers_needed:
            return serve
    return None


def advice_lines(job, rates, metrics_path: str | Path) -> list[str]:
    """One or two lines per streaming task of `job` saying how many serve nodes keep its trainer nodes fed at
    the rates measured in `metrics_path` (`load_rates`)."""
    unit = "tok/s"
    lines = [
        f"measured ({metrics_path}): supply {rates.supply_per_server:,.0f} {unit} per server "
        f"({'saturated: the run was starved' if rates.saturated else 'a lower bound: the run kept up'}), "
        f"demand {rates.demand_per_rank:,.0f} {unit} per trainer rank"
    ]
    for t in job.tasks:
        plan = t.plan
        if not plan.streaming or not plan.serve_ids:
            continue
        if plan.split_node:
            lines.append(f"[{t.name}] sizing: one node serves and trains; the rule sizes separate serve nodes")
            continue
        per_node = _ranks_per_node(t)
        ranks = len(plan.train_ids) * per_node
        advice = size_for_plan(rates, ranks)
        bound = "at most " if advice.upper_bound else ""
        per_train_node = advice.servers_per_trainer * per_node
        verdict = (
            "enough" if len(plan.serve_ids) >= advice.servers_needed else "too few: the trainers will wait"
        )
        lines.append(
            f"[{t.name}] sizing: {bound}{advice.servers_needed} serve node(s) keep {len(plan.train_ids)} train "
            f"node(s) x {per_node} rank(s) fed ({bound}{per_train_node:.2f} per train node, "
            f"{100 * advice.headroom:.0f}% headroom); the spec plans {len(plan.serve_ids)}: {verdict}"
        )
        best = _best_split(rates, plan.nodes, per_node)
        if best is not None and best != len(plan.serve_ids):
            lines.append(
                f"[{t.name}]   on the same {plan.nodes} nodes, serve_nodes={best} ({plan.nodes - best} train "
                "node(s)) is the most training that stays fed"
            )
    if len(lines) == 1:
        lines.append("sizing: no streaming task with serve nodes in this spec")
    return lines

