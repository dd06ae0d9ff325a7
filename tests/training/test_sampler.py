"""The resumable sharded sampler: disjoint shards, whole optimizer steps, exact continuation."""

import pytest

from modelopt_ext.training.sampler import ResumableShardedSampler


def _samplers(n, world, batch=2, accum=1, seed=3):
    return [
        ResumableShardedSampler(n, batch_size=batch, world_size=world, rank=r, grad_accum=accum, seed=seed)
        for r in range(world)
    ]


def test_shards_are_disjoint_and_cover_the_dataset():
    ss = _samplers(10, world=2, batch=2)
    for s in ss:
        s.set_epoch(0)
    seen = [i for s in ss for b in s for i in b]
    # 10 samples, 2 ranks x batch 2 = 4 per step -> 12 per epoch: every sample, 2 wrapped around.
    assert len(seen) == ss[0].epoch_length == 12
    assert set(seen) == set(range(10))
    order = ss[0].epoch_order(0)
    assert [i for b in ss[1] for i in b] == order[1::2]  # rank r reads order[r::world]


def test_every_rank_gets_the_same_number_of_whole_steps():
    ss = _samplers(11, world=3, batch=2, accum=2)
    for s in ss:
        s.set_epoch(0)
    lens = [len(list(s)) for s in ss]
    assert len(set(lens)) == 1 and lens[0] % 2 == 0
    assert ss[0].steps_per_epoch == lens[0] // 2


def test_epochs_reshuffle_deterministically():
    a, b = _samplers(20, 1, batch=4)[0], _samplers(20, 1, batch=4)[0]
    a.set_epoch(0)
    e0 = [i for x in a for i in x]
    a.set_epoch(1)
    e1 = [i for x in a for i in x]
    b.set_epoch(1)
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert [i for x in b for i in x] == e1


def test_resume_at_position_continues_with_the_exact_next_samples():
    full = _samplers(23, world=2, batch=3)
    for s in full:
        s.set_epoch(4)
    expected = [list(s)[2:] for s in full]  # after 2 micro-batches per rank
    resumed = _samplers(23, world=2, batch=3)
    for s in resumed:
        s.set_epoch(4, position=2 * 2 * 3)
    assert [list(s) for s in resumed] == expected


def test_resume_with_another_world_size_reads_only_unread_samples():
    one = _samplers(16, world=2, batch=2)
    for s in one:
        s.set_epoch(0)
    read = {i for s in one for b in list(s)[:1] for i in b}  # one micro-batch per rank: 4 samples
    other = _samplers(16, world=4, batch=1)
    for s in other:
        s.set_epoch(0, position=4)
    rest = [i for s in other for b in s for i in b]
    assert sorted(rest) == sorted(set(range(16)) - read)


def test_bad_positions_are_rejected():
    s = _samplers(10, world=2, batch=2)[0]
    with pytest.raises(ValueError, match="not a whole number of micro-batches"):
        s.set_epoch(0, position=3)
    with pytest.raises(ValueError, match="outside epoch"):
        s.set_epoch(0, position=100)
    with pytest.raises(ValueError, match="empty"):
        ResumableShardedSampler(0, batch_size=1)
