"""Mean Shift Rejection optimizer wrapper: the projection, exactness over training steps for
SGD and AdamW, the drift of the reference code's variants, and composition with AGC."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from normfree.nn.msr import apply_zero_mean_init, kernel_slice_means, zero_mean_conv_weights
from normfree.optim import attached
from normfree.optim.agc import AGC
from normfree.optim.msr import MeanShiftRejection, project_zero_mean_, zero_mean_eligible

STEPS = 8
ZERO_MEAN_TOL = 1e-6
DRIFT = 1e-3  # without an exact projection, the largest slice mean exceeds this after STEPS


class SmallConvNet(nn.Module):
    """3×3 and 1×1 convs (both kinds of constraint) and a linear classifier (unconstrained)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.fc(h.mean((2, 3)))


def make_model(seed: int = 0) -> SmallConvNet:
    torch.manual_seed(seed)
    model = SmallConvNet()
    apply_zero_mean_init(model, magnitude=1.0)
    return model


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=g) + 0.5, torch.randint(0, 4, (8,), generator=g)


def max_slice_mean(model: nn.Module) -> float:
    return max(kernel_slice_means(w).abs().max().item() for _, w in zero_mean_conv_weights(model))


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_hook: Callable[[nn.Module], None] | None = None,
    steps: int = STEPS,
) -> None:
    for step in range(steps):
        x, y = batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if grad_hook is not None:
            grad_hook(model)
        optimizer.step()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)


def with_msr(
    optimizer: torch.optim.Optimizer, *args: object, **kwargs: object
) -> torch.optim.Optimizer:
    """``optimizer`` with Mean Shift Rejection attached through its step hooks."""
    MeanShiftRejection(optimizer, *args, **kwargs)  # type: ignore[arg-type]
    return optimizer


# --------------------------------------------------------------------------------------------
# Reference-code variants (the authors' trainer.ZeroMeanNormaliseGrads), per spatial slice
# --------------------------------------------------------------------------------------------
def _slice_mean(g: torch.Tensor) -> torch.Tensor:
    return g.mean(dim=tuple(range(2, g.ndim)), keepdim=True)


@torch.no_grad()
def current_reference_hook(model: nn.Module, m: float = 0.99) -> None:
    """The later "current" version: g ← (1+m)·g − m·mean(g) = g + m·(g − mean(g))."""
    for _, w in zero_mean_conv_weights(model):
        w.grad.copy_((1 + m) * w.grad - m * _slice_mean(w.grad))


@torch.no_grad()
def orig_reference_hook(model: nn.Module, m: float = 0.99) -> None:
    """The ORIG version: g ← g − m·mean(g)."""
    for _, w in zero_mean_conv_weights(model):
        w.grad.sub_(m * _slice_mean(w.grad))


# --------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------
def test_project_zero_mean_is_the_orthogonal_projection() -> None:
    g = torch.Generator().manual_seed(1)
    for shape in [(6, 4, 3, 3), (6, 4, 1, 1), (5, 2, 3)]:
        t = torch.randn(shape, dtype=torch.float64, generator=g) + 1.0
        p = t.clone()
        project_zero_mean_(p)
        assert kernel_slice_means(p).abs().max().item() < 1e-15
        # orthogonal: the removed part is orthogonal to the kept part, and P is idempotent
        assert abs(float((p * (t - p)).sum())) < 1e-12
        again = p.clone()
        project_zero_mean_(again)
        torch.testing.assert_close(again, p, rtol=0, atol=1e-15)
    # explicit slow reference for a 3×3 kernel and a 1×1 kernel
    t = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g)
    ref = torch.stack([torch.stack([s - s.mean() for s in f]) for f in t])
    project_zero_mean_(t)
    torch.testing.assert_close(t, ref, rtol=0, atol=1e-15)
    t = torch.randn(3, 5, 1, 1, dtype=torch.float64, generator=g)
    ref = torch.stack([f - f.mean() for f in t])
    project_zero_mean_(t)
    torch.testing.assert_close(t, ref, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="ndim >= 3"):
        project_zero_mean_(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="tensors"):
        project_zero_mean_([1.0])  # type: ignore[list-item]


def test_eligibility() -> None:
    assert zero_mean_eligible(torch.zeros(4, 3, 3, 3))
    assert zero_mean_eligible(torch.zeros(4, 3, 1, 1))
    assert not zero_mean_eligible(torch.zeros(4, 1, 1, 1))  # depthwise 1×1
    assert not zero_mean_eligible(torch.zeros(4, 3))
    assert not zero_mean_eligible(torch.zeros(4))


# --------------------------------------------------------------------------------------------
# Training: exact with MSR, drift without
# --------------------------------------------------------------------------------------------
def test_without_msr_slice_means_drift() -> None:
    for make_opt in (sgd, adamw):
        model = make_model()
        assert max_slice_mean(model) < ZERO_MEAN_TOL
        train(model, make_opt(model))
        assert max_slice_mean(model) > DRIFT


def test_sgd_momentum_weight_decay_project_grad_stays_zero_mean() -> None:
    model = make_model()
    before = copy.deepcopy(model)
    train(model, with_msr(sgd(model), mode="project_grad"))
    assert max_slice_mean(model) < ZERO_MEAN_TOL
    # it trained: the weights moved
    assert (model.conv2.weight - before.conv2.weight).abs().max().item() > 1e-2


def test_adamw_needs_project_update() -> None:
    model = make_model()
    train(model, with_msr(adamw(model), mode="project_update"))
    assert max_slice_mean(model) < ZERO_MEAN_TOL
    # projecting only the gradient is not enough for Adam: 1/sqrt(v) rescales elementwise
    model = make_model()
    train(model, with_msr(adamw(model), mode="project_grad"))
    assert max_slice_mean(model) > DRIFT


def test_project_update_equals_projecting_the_update() -> None:
    """For weights on the isocline, w ← P(w + Δ) is w + P(Δ)."""
    model = make_model()
    reference = copy.deepcopy(model)
    opt = with_msr(adamw(model), mode="project_update")
    ref_opt = adamw(reference)
    x, y = batch(0)
    for m in (model, reference):
        nn.functional.cross_entropy(m(x), y).backward()
    project_zero_mean_([w.grad for _, w in zero_mean_conv_weights(reference)])
    start = {n: w.detach().clone() for n, w in zero_mean_conv_weights(reference)}
    ref_opt.step()
    with torch.no_grad():
        for n, w in zero_mean_conv_weights(reference):
            delta = w - start[n]
            project_zero_mean_(delta)
            w.copy_(start[n] + delta)
    opt.step()
    for (n, w), (_, r) in zip(zero_mean_conv_weights(model), zero_mean_conv_weights(reference)):
        torch.testing.assert_close(w, r, rtol=0, atol=1e-7, msg=n)


def test_reference_current_version_does_not_reject_the_mean() -> None:
    """g + m·(g − mean(g)) keeps the gradient mean: the weights drift as without MSR."""
    model = make_model()
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    means_before = [kernel_slice_means(w.grad) for _, w in zero_mean_conv_weights(model)]
    current_reference_hook(model)
    means_after = [kernel_slice_means(w.grad) for _, w in zero_mean_conv_weights(model)]
    for b, a in zip(means_before[:2], means_after[:2]):  # the 3×3 convs
        assert b.abs().max().item() > 1e-4
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    model = make_model()
    train(model, sgd(model), grad_hook=current_reference_hook)
    assert max_slice_mean(model) > DRIFT


def test_reference_orig_version_scales_the_mean_by_one_minus_m() -> None:
    model = make_model()
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    w = model.conv2.weight
    before = _slice_mean(w.grad).clone()
    orig_reference_hook(model, m=0.99)
    torch.testing.assert_close(_slice_mean(w.grad), 0.01 * before, rtol=1e-3, atol=1e-9)
    # the 1 % left over still moves the weights off the isocline (measured: 2.3e-4 after 8 steps)
    model = make_model()
    train(model, sgd(model), grad_hook=orig_reference_hook)
    assert max_slice_mean(model) > 1e-5


# --------------------------------------------------------------------------------------------
# The wrapper: selection, composition with AGC, shared state
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["msr_outside", "agc_outside"])
def test_composes_with_agc(order: str) -> None:
    model = make_model()
    opt = sgd(model)
    if order == "msr_outside":  # AGC's hook runs first, then the projection
        AGC(opt, clipping=0.01, model=model)
        MeanShiftRejection(opt)
    else:
        MeanShiftRejection(opt)
        AGC(opt, clipping=0.01, model=model)
    assert [type(a) for a in attached(opt)] == (
        [AGC, MeanShiftRejection] if order == "msr_outside" else [MeanShiftRejection, AGC]
    )
    train(model, opt)
    assert max_slice_mean(model) < ZERO_MEAN_TOL
    # AGC was active: the run differs from MSR alone
    plain = make_model()
    train(plain, with_msr(sgd(plain)))
    assert (plain.conv2.weight - model.conv2.weight).abs().max().item() > 1e-4


def test_selection_by_module_tensors_and_groups() -> None:
    model = make_model()

    def ids(opt: MeanShiftRejection) -> list[int]:
        return [id(p) for p in opt.constrained_parameters()]

    convs = [model.conv1.weight, model.conv2.weight, model.conv3.weight]
    assert ids(MeanShiftRejection(sgd(model))) == [id(p) for p in convs]
    assert ids(MeanShiftRejection(sgd(model), model)) == [id(p) for p in convs]
    opt = MeanShiftRejection(sgd(model), model, include=["conv1"])
    assert ids(opt) == [id(model.conv1.weight)]
    opt = MeanShiftRejection(sgd(model), [model.conv2.weight])
    assert ids(opt) == [id(model.conv2.weight)]

    groups = [
        {"params": [model.conv1.weight], "zero_mean": False},
        {"params": [p for n, p in model.named_parameters() if n != "conv1.weight"]},
    ]
    opt = MeanShiftRejection(torch.optim.SGD(groups, lr=0.1))
    assert ids(opt) == [id(model.conv2.weight), id(model.conv3.weight)]

    other = nn.Conv2d(3, 3, 3)
    with pytest.raises(ValueError, match="not in the optimizer"):
        MeanShiftRejection(sgd(model), [other.weight])
    with pytest.raises(ValueError, match="ndim >= 3"):
        MeanShiftRejection(sgd(model), [model.fc.weight])
    with pytest.raises(ValueError, match="mode"):
        MeanShiftRejection(sgd(model), mode="project")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Optimizer"):
        MeanShiftRejection(model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="include"):
        MeanShiftRejection(sgd(model), include=["conv1"])


def test_closure_state_dict_and_scheduler() -> None:
    model = make_model()
    opt = sgd(model)
    msr = MeanShiftRejection(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch(0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        sched.step()
    assert torch.isfinite(loss)
    assert max_slice_mean(model) < ZERO_MEAN_TOL
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    fresh = with_msr(sgd(model))
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert "project_grad" in repr(msr)
    # detached: the next step moves the slice means off zero again
    msr.remove()
    assert attached(opt) == []
    opt.step(closure)
    assert max_slice_mean(model) > ZERO_MEAN_TOL


def test_project_weights_snaps_onto_the_isocline() -> None:
    torch.manual_seed(5)
    model = SmallConvNet()  # default init: not zero-mean
    assert max_slice_mean(model) > 1e-3
    train(model, with_msr(sgd(model), mode="project_update"), steps=1)
    assert max_slice_mean(model) < ZERO_MEAN_TOL
