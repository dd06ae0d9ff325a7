"""LR schedules: warmup, shapes, and a weights_only-loadable scheduler state."""

import math

import pytest
import torch

from modelopt_ext.training.schedule import LRMultiplier, build_scheduler


def test_warmup_ramps_linearly_and_never_starts_at_zero():
    f = LRMultiplier("cosine", warmup_steps=4, total_steps=20)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "schedule, mid, end", [("constant", 1.0, 1.0), ("linear", 0.5, 0.0), ("cosine", 0.5, 0.0)]
)
def test_shapes_after_warmup(schedule, mid, end):
    f = LRMultiplier(schedule, warmup_steps=2, total_steps=12)
    assert f(2) == pytest.approx(1.0)
    assert f(7) == pytest.approx(mid)
    assert f(12) == pytest.approx(end, abs=1e-12)
    assert f(50) == pytest.approx(end, abs=1e-12)  # clamped past the end


def test_cosine_quarter_point():
    f = LRMultiplier("cosine", warmup_steps=0, total_steps=4, min_ratio=0.1)
    assert f(1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_bad_schedule_rejected():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        LRMultiplier("step", 0, 10)


def test_scheduler_state_round_trips_with_weights_only(tmp_path):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, "linear", 2, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched2 = build_scheduler(opt2, "linear", 2, 10)
    sched2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for _ in range(3):
        opt.step(), sched.step(), opt2.step(), sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
