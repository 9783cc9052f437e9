"""The optional native Scaled-WS kernels (normfree.nn.native): the same training step and the
same float32 numbers as the PyTorch-op path, the floor, the switch and its fallback when the
extension cannot be built. Their float64 equality with the analytic function (floor included,
with gradcheck) is tests/nn/test_ws.py::test_eager_cpu_function_equals_the_analytic_one."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import normfree
from normfree.nn import native
from normfree.nn.ws import (
    ScaledStdConv2d,
    _ScaledStandardize,
    scaled_standardize,
    unit_norm_from_forward,
)


@pytest.fixture(scope="module")
def kernels():
    """The kernels switched on for one test at a time (built once per machine, ~30 s)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with native.native_kernels(True) as on:
            if not on:
                pytest.skip("no C++ compiler/OpenMP here: the native kernels cannot be built")
    return native


@pytest.fixture
def native_on(kernels):
    with native.native_kernels(True):
        yield


def _weights(floored: bool, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3 + int(floored))
    w = torch.randn(6, 4, 3, 3, dtype=dtype, generator=gen) + 0.3
    if floored:  # one unit with N·var far below eps: the official floor is active there
        w[3] = 0.2 + 1e-6 * torch.randn(4, 3, 3, dtype=dtype, generator=gen)
    gain = torch.rand(6, dtype=dtype, generator=gen) + 0.5
    upstream = torch.randn(6, 4, 3, 3, dtype=dtype, generator=gen)
    return w.requires_grad_(), gain.requires_grad_(), upstream


def test_float32_and_odd_fan_ins_match_the_op_path(kernels) -> None:
    # fan-ins around the kernels' 8-lane blocks, a non-contiguous (channels_last) weight
    # (fan-ins ≥ 4 and a fixed seed: with 2–3 weights per unit the backward's projection
    # cancels almost all of s·δ and float32 rounding of either path dominates the result)
    gen = torch.Generator().manual_seed(7)
    for shape in [(5, 4, 1, 1), (7, 5, 1, 1), (16, 9, 1, 1), (33, 17, 3, 3), (64, 3, 7, 7)]:
        w = torch.randn(shape, generator=gen).mul_(0.2).add_(0.01)
        w = w.contiguous(memory_format=torch.channels_last)
        gain = torch.rand(shape[0], generator=gen) + 0.5
        up = torch.randn(shape, generator=gen)
        results = []
        for on in (True, False):
            with native.native_kernels(on):
                wr, gr = w.clone().requires_grad_(), gain.clone().requires_grad_()
                out = scaled_standardize(wr, gr, 1e-4, 1.3)
                results.append((out, *torch.autograd.grad(out, (wr, gr), up)))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_fan_in_one_is_all_floor(native_on) -> None:
    # one weight per unit: N·var = 0, every unit floored, Ŵ = 0 and ∂L/∂W = 0 (float64, where
    # the rounding of the op path's cancelling terms, ~1e-14 at scale 130, is below atol)
    w = torch.randn(5, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    gain = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    out = scaled_standardize(w, gain, 1e-4, 1.3)
    assert torch.equal(out, torch.zeros_like(out))
    ref = _ScaledStandardize.apply(w, gain, 1e-4, 1.3)
    up = torch.randn(5, 1, 1, 1, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (w, gain), up),
                    torch.autograd.grad(ref, (w, gain), up)):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_training_step_matches_the_op_path(kernels) -> None:
    # NF-ResNet with folded scales: every WS conv (gains, α/γ scales, skip gains) in one step
    torch.manual_seed(0)
    model = normfree.create_model("nf_resnet_cifar20", num_classes=10).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skip_gain.gain"):
                p.fill_(0.3)  # non-zero, so every branch's gradients are exercised
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 9])
    grads = []
    for on in (True, False):
        model.zero_grad()
        with native.native_kernels(on):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_n, g_n), (loss_o, g_o) = grads
    torch.testing.assert_close(loss_n, loss_o, rtol=1e-12, atol=0)
    for name in g_o:
        torch.testing.assert_close(g_n[name], g_o[name], rtol=1e-9, atol=1e-12, msg=name)


def test_eval_and_agc_statistics_use_the_kernel(native_on) -> None:
    conv = ScaledStdConv2d(8, 16, 3).double()
    with torch.no_grad():
        a = conv.standardized_weight()
    ref = _ScaledStandardize.apply(conv.weight.detach(), conv.gain.detach(), conv.eps, 1.0)
    torch.testing.assert_close(a, ref, rtol=1e-13, atol=1e-14)
    conv(torch.randn(2, 8, 5, 5, dtype=torch.float64))  # a training forward leaves the stats
    norms = unit_norm_from_forward(conv.weight)
    direct = conv.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, direct, rtol=1e-12, atol=0)


def test_switch_and_context_manager(kernels) -> None:
    before = native.native_kernels_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with native.native_kernels(not before):
            assert native.native_kernels_enabled() is (not before)
            raise RuntimeError("boom")
    assert native.native_kernels_enabled() is before  # restored on error
    with pytest.raises(TypeError, match="bool"):
        native.set_native_kernels("yes")  # type: ignore[arg-type]
    w, gain, _ = _weights(False)
    with native.native_kernels(False):
        out = scaled_standardize(w, gain, 1e-4, 1.0)
        assert type(out.grad_fn).__name__ == "_ScaledStandardizeCPUBackward"
    with native.native_kernels(True):
        half = scaled_standardize(w.detach().to(torch.bfloat16), None)  # other dtypes: op path
        assert half.dtype == torch.bfloat16


def test_a_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.cpp_extension as cpp

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'normfree_native': g++ not found")

    monkeypatch.setattr(native, "_extension", None)
    monkeypatch.setattr(native, "_build_failed", False)
    monkeypatch.setattr(native, "_enabled", False)
    monkeypatch.setattr(cpp, "load", fail)
    with pytest.warns(RuntimeWarning, match="g\\+\\+ not found.*PyTorch-op path"):
        assert native.set_native_kernels(True) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second build attempt
        assert native.set_native_kernels(True) is False
        assert native.native_kernels_enabled() is False
        w, gain, _ = _weights(False)
        out = scaled_standardize(w, gain, 1e-4, 1.0)
    assert type(out.grad_fn).__name__ == "_ScaledStandardizeCPUBackward"
