"""Segment-aware node-role plan: which Slurm node ids serve hidden states and which train.

Computed once here and handed to every node as environment variables (see `RolePlan.env`), so entry
scripts never recompute it (common/lib/plan.sh reads it).

Rules:
- `nodes % segment == 0` (Slurm's --segment packs nodes into topology blocks of that size);
- streaming tasks need at least one serve node, and fewer serve nodes than nodes; a single node is the
  exception: it serves and trains at once (its GPUs are split), so node 0 is in both lists;
- with a segment, every segment that holds trainers also holds a server, so hidden-state traffic stays
  inside the segment's fast interconnect; each trainer prefers a server of its own segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class TopologyError(ValueError):
    """A topology that cannot work; `field` is the spec key to blame ('segment', 'nodes', 'serve_nodes')."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class RolePlan:
    """Node roles for one task; node ids are SLURM_NODEID values (0..nodes-1)."""

    nodes: int
    serve_ids: tuple[int, ...]
    train_ids: tuple[int, ...]
    trainer_server: dict[int, int] = field(default_factory=dict)
    segment: int | None = None
    gpus_per_node: int | None = None
    streaming: bool = False

    @property
    def split_node(self) -> bool:
        """One node that both serves and trains (its GPUs are split between the two)."""
        return bool(set(self.serve_ids) & set(self.train_ids))

    def env(self) -> dict[str, str]:
        """The env contract: SERVE_NODES, SERVE_NODE_IDS, TRAIN_NODE_IDS, TRAINER_SERVER_MAP, SEGMENT_SIZE."""
        return {
            "SERVE_NODES": str(len(self.serve_ids)),
            "SERVE_NODE_IDS": ",".join(map(str, self.serve_ids)),
            "TRAIN_NODE_IDS": ",".join(map(str, self.train_ids)),
            "TRAINER_SERVER_MAP": ",".join(f"{t}:{s}" for t, s in sorted(self.trainer_server.items())),
            "SEGMENT_SIZE": "" if self.segment is None else str(self.segment),
        }

    def describe(self) -> list[str]:
        """The plan in plain words, one line each (printed by --dryrun)."""
        gpus = f" x {self.gpus_per_node} GPUs" if self.gpus_per_node else ""
        lines = [f"{self.nodes} node(s){gpus}" + (f", segments of {self.segment}" if self.segment else "")]
        if not self.streaming and not self.serve_ids:
            lines.append(f"all nodes run the task: {_ids(self.train_ids)}")
            return lines
        if self.split_node:
            lines.append("node 0 serves hidden states AND trains (single node: its GPUs are split)")
            return lines
        lines.append(f"serve nodes: {_ids(self.serve_ids)}")
        lines.append(f"train nodes: {_ids(self.train_ids)}")
        if self.gpus_per_node:
            lines.append(
                f"training ranks: {len(self.train_ids)} node(s) x {self.gpus_per_node} GPUs = "
                f"{len(self.train_ids) * self.gpus_per_node}"
            )
        pairs = ", ".join(f"{t}->{s}" for t, s in sorted(self.trainer_server.items()))
        lines.append(f"trainer -> preferred server: {pairs}")
        if self.segment and self.segment < self.nodes:
            segs = []
            for k in range(self.nodes // self.segment):
                members = range(k * self.segment, (k + 1) * self.segment)
                s = [i for i in members if i in self.serve_ids]
                t = [i for i in members if i in self.train_ids]
                segs.append(f"segment {k} = nodes {_ids(members)} (serve {_ids(s)}; train {_ids(t)})")
            lines.extend(segs)
            lines.append(
                "every segment with trainers has its own server: hidden states stay inside the segment"
            )
        return lines


def _ids(ids) -> str:
    ids = list(ids)
    return ",".join(map(str, ids)) if ids else "none"


def _workable_segments(nodes: int, serve: int | None, gpus: int | None, streaming: bool) -> str:
    ok = []
    for d in range(1, nodes + 1):
        if nodes % d == 0:
            try:
                plan_roles(nodes, serve, segment=d, gpus_per_node=gpus, streaming=streaming)
                ok.append(str(d))
            except TopologyError:
                pass
    return ", ".join(ok) or "none (fix nodes or serve nodes first)"


def plan_roles(
    nodes: int,
    serve_nodes: int | None,
    *,
    segment: int | None = None,
    gpus_per_node: int | None = None,
    streaming: bool = False,
) -> RolePlan:
    """Check the topology and compute the role plan; raise TopologyError naming the field to fix."""
    if nodes < 1:
        raise TopologyError("nodes", f"must be >= 1 (got {nodes})")
    if segment is not None:
        if segment < 1:
            raise TopologyError("segment", f"must be >= 1 (got {segment})")
        if nodes % segment:
            raise TopologyError(
                "segment",
                f"{segment} does not divide nodes={nodes} (nodes % segment must be 0); allowed here: "
                + _workable_segments(nodes, serve_nodes, gpus_per_node, streaming),
            )
    serve = serve_nodes
    if not streaming and not serve:
        return RolePlan(nodes, (), tuple(range(nodes)), {}, segment, gpus_per_node, streaming)
    if streaming and serve is None:
        serve = 1
    assert serve is not None
    if streaming and serve < 1:
        raise TopologyError("serve_nodes", f"a streaming task needs at least 1 serve node (got {serve})")
    if nodes == 1:
        if serve > 1:
            raise TopologyError("serve_nodes", f"{serve} serve nodes but the task has 1 node")
        if gpus_per_node is not None and gpus_per_node == 1:
            raise TopologyError(
                "gpus_per_node", "a single node that serves and trains needs >= 2 GPUs to split (got 1)"
            )
        return RolePlan(1, (0,), (0,), {0: 0}, segment, gpus_per_node, streaming)
    if serve >= nodes:
        raise TopologyError(
            "serve_nodes",
            f"{serve} serve nodes leave no trainer among {nodes} nodes (allowed: 1..{nodes - 1})",
        )
    seg = segment if segment is not None else nodes
    groups = nodes // seg
    if groups > 1 and serve < groups:
        raise TopologyError(
            "segment",
            f"segment={seg} makes {groups} segments but only {serve} serve node(s): every segment with "
            f"trainers needs its own server (use serve nodes >= {groups}, or a larger segment)",
        )
    serve_ids: list[int] = []
    train_ids: list[int] = []
    trainer_server: dict[int, int] = {}
    for k in range(groups):
        # Spread servers evenly over segments; the first ids of each segment serve.
        n_serve = serve // groups + (1 if k < serve % groups else 0)
        members = list(range(k * seg, (k + 1) * seg))
        servers, trainers = members[:n_serve], members[n_serve:]
        serve_ids.extend(servers)
        train_ids.extend(trainers)
        for j, t in enumerate(trainers):
            trainer_server[t] = servers[j % len(servers)]
    return RolePlan(
        nodes, tuple(serve_ids), tuple(train_ids), trainer_server, segment, gpus_per_node, streaming
    )
