"""The native tanh-GELU kernels (``csrc/tanh_gelu.h``, switched on with the other native CPU
kernels of normfree.nn.native): float32 values and gradients against the float64 formula, the
same training step as the PyTorch-op path, layouts, special values, double backward, and the
inputs that keep the op path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import normfree
from normfree.nn import native
from normfree.nn.activations import TanhGELU

EPS32 = torch.finfo(torch.float32).eps


def sigmoid_form(x: torch.Tensor) -> torch.Tensor:
    """tanh-GELU in float64 as ``x·sigmoid(2u)``: the same function as ``0.5·x·(1 + tanh u)``
    without its cancellation for negative x (where the tanh form loses every digit even in
    float64 below x ≈ -7)."""
    x = x.double()
    u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
    return x * torch.sigmoid(2.0 * u)


def _amplified(x: torch.Tensor) -> torch.Tensor:
    """|2u| where u < 0 (exp's condition number at the argument the kernel rounds), else 0."""
    u = math.sqrt(2.0 / math.pi) * (x.double() + 0.044715 * x.double() ** 3)
    return (-2.0 * u).clamp_min(0.0)


def _inputs(n: int = 200_003) -> torch.Tensor:
    # a fine grid over the range where the function bends, plus wide normals; the odd length
    # leaves a tail in the kernels' vector loops and an uneven split over the threads
    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(-12.0, 12.0, n // 2)
    return torch.cat([grid, 4.0 * torch.randn(n - n // 2, generator=gen)])


def test_forward_is_within_two_ulps_of_the_float64_formula(native_on) -> None:
    x = _inputs()
    got = TanhGELU()(x).double()
    ref = sigmoid_form(x)
    # 2 ulps of the result, plus the float32 rounding of the argument 2u (four roundings,
    # relative error < 2 eps), which exp amplifies by its condition number |2u| for x < 0:
    # any float32 evaluation has it; for x < -10, where sigmoid(2u) falls below float32's
    # smallest normal number, the kernel's exponential returns 0 and |y| < 11·tiny is lost
    bound = (2 + 2 * _amplified(x)) * EPS32 * ref.abs() + 16 * torch.finfo(torch.float32).tiny
    assert ((got - ref).abs() <= bound).all(), ((got - ref).abs() - bound).max()


def test_gradient_is_within_a_few_ulps_of_the_float64_derivative(native_on) -> None:
    x = _inputs()
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(x.shape, generator=gen)
    x32 = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(TanhGELU()(x32), x32, g)
    x64 = x.double().requires_grad_()
    (ref,) = torch.autograd.grad(sigmoid_form(x64), x64, g.double())
    # the derivative's two terms partly cancel for negative x: bound by their magnitudes
    x64 = x.double()
    s = torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3))
    du = 2.0 * math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * x64**2)
    scale = g.double().abs() * (s + (x64 * s * (1 - s) * du).abs())
    bound = (4 + 2 * _amplified(x)) * EPS32 * scale + 1e-35  # as for the forward
    assert ((got.double() - ref).abs() <= bound).all()


def test_the_kernels_run_and_match_the_op_path(native_on, monkeypatch: pytest.MonkeyPatch) -> None:
    ext = native.extension("tanh_gelu")
    calls = {"tanh_gelu_forward": 0, "tanh_gelu_backward": 0}

    class Counting:
        def __getattr__(self, name: str):
            if name in calls:
                calls[name] += 1
            return getattr(ext, name)

    monkeypatch.setattr(native, "extension", lambda kernel: Counting())
    gen = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(4, 16, 9, 9, generator=gen)).requires_grad_()
    g = torch.randn(4, 16, 9, 9, generator=gen)
    y = TanhGELU()(x)
    (dx,) = torch.autograd.grad(y, x, g)
    assert calls == {"tanh_gelu_forward": 1, "tanh_gelu_backward": 1}
    with native.native_kernels(False):
        y_ops = TanhGELU()(x)
        (dx_ops,) = torch.autograd.grad(y_ops, x, g)
    torch.testing.assert_close(y, y_ops, rtol=4 * EPS32, atol=4 * EPS32)
    torch.testing.assert_close(dx, dx_ops, rtol=8 * EPS32, atol=8 * EPS32)


def test_channels_last_keeps_its_layout_and_other_inputs_keep_the_op_path(native_on) -> None:
    gen = torch.Generator().manual_seed(3)
    x = 2 * torch.randn(2, 8, 5, 7, generator=gen)
    cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = TanhGELU()(cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), rtol=4e-7, atol=4e-7)
    g = torch.randn(2, 8, 5, 7, generator=gen)  # NCHW upstream for a channels-last input
    (dx,) = torch.autograd.grad(y, cl, g)
    (ref,) = torch.autograd.grad(F.gelu(cl, approximate="tanh"), cl, g)
    torch.testing.assert_close(dx, ref, rtol=1e-6, atol=1e-6)
    negated = torch._neg_view(x)  # a lazily negated view: the op path reads it right
    torch.testing.assert_close(
        TanhGELU()(negated), F.gelu(-x, approximate="tanh"), rtol=4e-7, atol=4e-7
    )
    up = torch.randn(2, 8, 5, 7, generator=gen)  # a lazily negated upstream gradient
    xg = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(TanhGELU()(xg), xg, torch._neg_view(up))
    (ref,) = torch.autograd.grad(F.gelu(xg, approximate="tanh"), xg, -up)
    torch.testing.assert_close(dx, ref, rtol=1e-6, atol=1e-6)
    strided = x[:, ::2]  # not dense: the op path
    torch.testing.assert_close(
        TanhGELU()(strided), F.gelu(strided, approximate="tanh"), rtol=4e-7, atol=4e-7
    )
    x64 = x.double()  # float64: the op path, bit for bit what it gives with the kernels off
    with native.native_kernels(False):
        off = TanhGELU()(x64)
    assert torch.equal(TanhGELU()(x64), off)


def test_special_values_are_pytorchs(native_on) -> None:
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e20, -1e20,
                      -100.0, 100.0, -9.0, 1e-30])  # fmt: skip
    got, ref = TanhGELU()(x), F.gelu(x, approximate="tanh")
    assert torch.equal(got.isnan(), ref.isnan())  # nan, and -inf·0
    assert got[1] == ref[1] == float("inf")
    assert torch.equal(got[3:-2], ref[3:-2])  # ±0, ±1e20, ±100: exact, signs included
    assert torch.equal(got[3:-2].signbit(), ref[3:-2].signbit())
    # at -9 PyTorch's 1 + tanh(u) rounds to 0; the kernel keeps the float64 value's digits
    # (to the bound of the forward's test)
    ref = sigmoid_form(x[-2:])
    assert (
        (got[-2:].double() - ref).abs() <= (2 + 2 * _amplified(x[-2:])) * EPS32 * ref.abs()
    ).all()


def test_double_backward_takes_the_differentiable_op(native_on) -> None:
    gen = torch.Generator().manual_seed(4)
    x = (2 * torch.randn(3, 5, generator=gen)).requires_grad_()
    g = torch.randn(3, 5, generator=gen)
    (dx,) = torch.autograd.grad(TanhGELU()(x), x, g, create_graph=True)
    (d2,) = torch.autograd.grad(dx.sum(), x)
    (dx_ref,) = torch.autograd.grad(F.gelu(x, approximate="tanh"), x, g, create_graph=True)
    (d2_ref,) = torch.autograd.grad(dx_ref.sum(), x)
    assert torch.equal(dx, dx_ref) and torch.equal(d2, d2_ref)


def test_a_gelu_network_trains_the_same_step(native_on) -> None:
    # a GELU NF-ResNet in float32: loss and every gradient as with the PyTorch-op GELU
    torch.manual_seed(0)
    model = normfree.create_model("nf_resnet_cifar20", num_classes=10, activation="gelu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skip_gain.gain"):
                p.fill_(0.3)  # non-zero, so every branch's gradients are exercised
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 3, 5, 9])
    results = []
    for on in (True, False):
        model.zero_grad()
        with native.native_kernels(on):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_n, g_n), (loss_o, g_o) = results
    torch.testing.assert_close(loss_n, loss_o, rtol=1e-5, atol=0)
    for a, b in zip(g_n, g_o):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * b.abs().max().item() + 1e-8)
