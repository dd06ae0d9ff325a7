"""Distributed helpers: the accelerate single-process fallback is detected; collectives are no-ops alone."""

import torch

from modelopt_ext.training.distributed import (
    DistEnv,
    all_reduce_mean_,
    all_reduce_sum,
    single_process_from_accelerate,
)


def test_accelerate_single_process_fallback_is_detected():
    # What `accelerate launch --num_processes 2 x.py` sets on a CPU machine (measured, accelerate 1.15).
    fallback = {"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert single_process_from_accelerate(fallback)
    assert not single_process_from_accelerate({**fallback, "WORLD_SIZE": "2", "RANK": "0"})
    assert not single_process_from_accelerate({"ACCELERATE_MIXED_PRECISION": "no"})  # asked for one process
    assert not single_process_from_accelerate({})


def test_collectives_are_identity_for_one_process():
    t = [torch.ones(3), torch.full((2, 2), 4.0)]
    all_reduce_mean_(t, DistEnv())
    assert torch.equal(t[0], torch.ones(3)) and torch.equal(t[1], torch.full((2, 2), 4.0))
    assert all_reduce_sum([1.0, 2.5], DistEnv()) == [1.0, 2.5]
