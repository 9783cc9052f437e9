"""Warmup + cosine learning-rate schedule (Brock et al. 2021b, App. C; DeepMind
``optim.WarmupCosineDecay``): values at specific steps against the closed form."""

from __future__ import annotations

import math

import pytest
import torch

from normfree.optim.schedules import WarmupDecayLR, lr_factor, scaled_peak_lr, warmup_cosine_lr


def test_scaled_peak_lr_is_nfnet_rule() -> None:
    assert scaled_peak_lr(0.1, 4096) == pytest.approx(1.6, abs=1e-15)
    assert scaled_peak_lr(0.1, 256) == 0.1
    with pytest.raises(ValueError, match="batch_size"):
        scaled_peak_lr(0.1, 0)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # linear warmup from 0
        (5, 0.5),
        (9, 0.9),
        (10, 1.0),  # peak at the end of warmup
        (35, 0.5 * (1 + math.cos(math.pi * 0.25))),
        (60, 0.5),  # cosine midpoint
        (110, 0.0),  # end of the schedule
        (500, 0.0),  # clamped past the end
    ],
)
def test_cosine_factor_at_steps(step: int, expected: float) -> None:
    assert lr_factor(step, warmup_steps=10, total_steps=110) == pytest.approx(expected, abs=1e-15)


def test_final_ratio_and_other_decays() -> None:
    # cosine midpoint with a floor: final + (1 - final)/2
    assert lr_factor(60, 10, 110, final_ratio=0.1) == pytest.approx(0.55, abs=1e-15)
    assert lr_factor(110, 10, 110, final_ratio=0.1) == pytest.approx(0.1, abs=1e-15)
    assert lr_factor(35, 10, 110, decay="linear") == pytest.approx(0.75, abs=1e-15)
    assert lr_factor(100, 10, 110, decay="constant") == 1.0
    assert lr_factor(0, 0, 10) == 1.0  # no warmup: start at the peak


def test_warmup_cosine_lr_matches_official_formula() -> None:
    peak, warm, total = 1.6, 5 * 312, 360 * 312

    def official(step: int) -> float:  # DeepMind optim.WarmupCosineDecay, end value 0
        if step < warm:
            return peak * step / warm
        x = min(step - warm, total - warm)
        return 0.5 * peak * (1 + math.cos(math.pi * x / (total - warm)))

    for step in (0, 1, 777, warm, warm + 1, 50_000, total - 1, total):
        assert warmup_cosine_lr(step, peak, warm, total) == pytest.approx(official(step), rel=1e-12)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(0, 0, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_factor(0, 20, 10)
    with pytest.raises(ValueError, match="decay"):
        lr_factor(0, 1, 10, decay="exp")
    with pytest.raises(ValueError, match="step"):
        lr_factor(-1, 1, 10)


def test_scheduler_scales_each_group_and_resumes() -> None:
    w1, w2 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [w1], "lr": 0.4}, {"params": [w2], "lr": 0.04}], lr=0.4)
    sched = WarmupDecayLR(opt, warmup_steps=4, total_steps=20)
    seen = []
    for _ in range(12):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for t, (lr1, lr2) in enumerate(seen):
        f = lr_factor(t, 4, 20)
        assert lr1 == pytest.approx(0.4 * f, abs=1e-15)
        assert lr2 == pytest.approx(0.04 * f, abs=1e-15)  # the 1/10 group keeps its ratio
    # a fresh scheduler restored from state continues exactly
    opt2 = torch.optim.SGD([{"params": [w1], "lr": 0.4}, {"params": [w2], "lr": 0.04}], lr=0.4)
    sched2 = WarmupDecayLR(opt2, warmup_steps=4, total_steps=20)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    opt.step()
    sched.step()
    opt2.step()
    sched2.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]


def test_warmup_cosine_lr_names_the_argument_it_refuses() -> None:
    with pytest.raises(ValueError, match=r"final_lr must be in \[0, peak_lr = 0.1\], got 1.0"):
        warmup_cosine_lr(5, 0.1, 2, 10, final_lr=1.0)
    assert warmup_cosine_lr(10, 0.1, 2, 10, final_lr=0.1) == pytest.approx(0.1)


def test_step_counts_must_be_ints() -> None:
    import numpy as np

    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(TypeError, match=r"warmup_steps must be an int \(a count of steps\)"):
        WarmupDecayLR(opt, 1.5, 5)
    with pytest.raises(TypeError, match="total_steps must be an int"):
        lr_factor(0, 1, 5.5)
    assert lr_factor(1, np.int64(2), np.int64(4)) == pytest.approx(0.5)


def test_exponential_decay_is_tensorflows_staircase_from_step_zero() -> None:
    """EfficientNet's schedule: warmup to the peak, then ``rate^⌊t/P⌋`` with t counted from
    step 0 (so warmup's periods count: at t = W = 25 with P = 10 the factor is 0.5² already),
    held after ``total_steps``, never below ``final_ratio``."""
    f = [lr_factor(t, 25, 100, 0.0, "exponential", 0.5, 10) for t in range(0, 120)]
    assert f[:25] == [t / 25 for t in range(25)]
    assert f[25:30] == [0.25] * 5 and f[30] == 0.125 and f[99] == 0.5**9
    assert f[100:] == [0.5**10] * 20
    assert lr_factor(99, 0, 100, 0.01, "exponential", 0.5, 10) == 0.01  # the floor
    sched = WarmupDecayLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0), 0, 50,
                          decay="exponential", decay_rate=0.97, decay_steps=3)  # fmt: skip
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs == pytest.approx([2.0 * 0.97 ** (t // 3) for t in range(10)], rel=1e-15)
    with pytest.raises(ValueError, match="decay_steps"):
        lr_factor(5, 0, 10, 0.0, "exponential")
    with pytest.raises(ValueError, match="decay_rate"):
        lr_factor(5, 0, 10, 0.0, "exponential", 1.5, 2)
