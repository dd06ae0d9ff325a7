"""Role plans: who serves, who trains, segment placement and the topology rules."""

from __future__ import annotations

import pytest

from launcher.topology import TopologyError, plan_roles


def test_segment_places_one_server_per_segment_and_pairs_trainers_in_segment():
    plan = plan_roles(4, 2, segment=2, gpus_per_node=4, streaming=True)
    assert plan.serve_ids == (0, 2) and plan.train_ids == (1, 3)
    assert plan.env() == {
        "SERVE_NODES": "2",
        "SERVE_NODE_IDS": "0,2",
        "TRAIN_NODE_IDS": "1,3",
        "TRAINER_SERVER_MAP": "1:0,3:2",
        "SEGMENT_SIZE": "2",
    }
    text = "\n".join(plan.describe())
    assert "segment 0 = nodes 0,1 (serve 0; train 1)" in text
    assert "hidden states stay inside the segment" in text
    assert "2 node(s) x 4 GPUs = 8" in text


def test_without_segment_first_nodes_serve_and_trainers_round_robin():
    plan = plan_roles(5, 2, streaming=True)
    assert plan.serve_ids == (0, 1) and plan.train_ids == (2, 3, 4)
    assert plan.env()["TRAINER_SERVER_MAP"] == "2:0,3:1,4:0"
    assert plan.env()["SEGMENT_SIZE"] == ""


def test_more_servers_than_segments_are_spread_evenly():
    plan = plan_roles(6, 4, segment=3, streaming=True)
    # segment 0 = 0,1,2 gets 2 servers; segment 1 = 3,4,5 gets 2 servers.
    assert plan.serve_ids == (0, 1, 3, 4) and plan.train_ids == (2, 5)
    assert plan.trainer_server == {2: 0, 5: 3}
    for t, s in plan.trainer_server.items():
        assert t // 3 == s // 3  # same segment


def test_three_node_test_cluster_plan():
    plan = plan_roles(3, 1, streaming=True)
    assert plan.env()["SERVE_NODE_IDS"] == "0" and plan.env()["TRAIN_NODE_IDS"] == "1,2"
    assert plan.env()["TRAINER_SERVER_MAP"] == "1:0,2:0"


def test_single_node_streaming_serves_and_trains_on_node_zero():
    plan = plan_roles(1, 1, gpus_per_node=8, streaming=True)
    assert plan.split_node and plan.serve_ids == (0,) and plan.train_ids == (0,)
    assert "serves hidden states AND trains" in "\n".join(plan.describe())
    assert plan_roles(1, None, streaming=True).split_node  # default: one serve node


def test_non_streaming_task_runs_on_all_nodes():
    plan = plan_roles(3, None)
    assert plan.serve_ids == () and plan.train_ids == (0, 1, 2)
    assert plan.env()["SERVE_NODES"] == "0" and plan.env()["TRAIN_NODE_IDS"] == "0,1,2"


@pytest.mark.parametrize(
    ("kwargs", "field", "text"),
    [
        (
            {"nodes": 4, "serve_nodes": 2, "segment": 3, "streaming": True},
            "segment",
            "3 does not divide nodes=4",
        ),
        (
            {"nodes": 4, "serve_nodes": 1, "segment": 2, "streaming": True},
            "segment",
            "every segment with trainers",
        ),
        ({"nodes": 4, "serve_nodes": 2, "segment": 1, "streaming": True}, "segment", "4 segments"),
        ({"nodes": 4, "serve_nodes": 4, "streaming": True}, "serve_nodes", "leave no trainer"),
        ({"nodes": 4, "serve_nodes": 0, "streaming": True}, "serve_nodes", "at least 1 serve node"),
        ({"nodes": 1, "serve_nodes": 2, "streaming": True}, "serve_nodes", "task has 1 node"),
        ({"nodes": 1, "serve_nodes": 1, "gpus_per_node": 1, "streaming": True}, "gpus_per_node", ">= 2 GPUs"),
    ],
)
def test_impossible_topologies_name_the_field(kwargs, field, text):
    nodes = kwargs.pop("nodes")
    serve = kwargs.pop("serve_nodes")
    with pytest.raises(TopologyError) as e:
        plan_roles(nodes, serve, **kwargs)
    assert e.value.field == field
    assert text in str(e.value)


def test_segment_error_lists_workable_segments():
    with pytest.raises(TopologyError) as e:
        plan_roles(4, 2, segment=3, streaming=True)
    assert str(e.value).endswith("allowed here: 2, 4")
