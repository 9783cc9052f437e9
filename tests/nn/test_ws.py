"""Weight-standardized convs (normfree.nn.ws): formula, init, signal propagation, inference
cache, "SAME" padding, folding and export."""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable, Iterable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compile_backends import graphs_seen
from normfree.nn import (
    Conv2dSame,
    ScaledStdConv2d,
    StdConv2dBase,
    WSConv2d,
    fold_weight_standardization,
    qiao_standardize,
    scaled_standardize,
)

RELU_GAMMA = 1.7139588594436646  # official γ for ReLU (the activations module is separate)


def slow_scaled_ws(
    weight: torch.Tensor, gain: torch.Tensor, eps: float, gamma: float
) -> torch.Tensor:
    """Official formula, float64, one output channel at a time."""
    w = weight.detach().double()
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        flat = w[o].flatten()
        n = flat.numel()
        mean = flat.sum() / n
        var = ((flat - mean) ** 2).sum() / n  # biased
        scale = 1.0 / math.sqrt(max(n * var.item(), eps))  # eps floors N·var
        out[o] = float(gain[o].detach()) * gamma * (w[o] - mean) * scale
    return out


def slow_qiao_ws(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    w = weight.detach().double()
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        flat = w[o].flatten()
        mean = flat.mean()
        std = math.sqrt(((flat - mean) ** 2).sum().item() / (flat.numel() - 1))  # unbiased
        out[o] = (w[o] - mean) / (std + eps)
    return out


def _conv(m: StdConv2dBase, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reference forward with an explicit weight: manual "SAME" pad + conv."""
    if m.dynamic_padding:
        from normfree.nn import pad_same

        x = pad_same(x, m.kernel_size, m.stride, m.dilation)
    return F.conv2d(x, weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


# --------------------------------------------------------------------------- formula


@pytest.mark.parametrize(("cin", "cout", "k", "groups"), [(4, 6, 3, 1), (6, 8, 3, 2), (8, 8, 1, 8)])
def test_effective_weight_matches_slow_reference(cin: int, cout: int, k: int, groups: int) -> None:
    torch.manual_seed(0)
    m = ScaledStdConv2d(cin, cout, k, groups=groups, gamma=RELU_GAMMA)
    with torch.no_grad():
        m.weight.mul_(3.0).add_(0.5)  # non-zero mean, non-unit scale
        m.gain.uniform_(0.5, 2.0)
    ref = slow_scaled_ws(m.weight, m.gain, 1e-4, RELU_GAMMA)
    assert m.fan_in == (cin // groups) * k * k
    torch.testing.assert_close(m.standardized_weight().double(), ref, atol=1e-6, rtol=0)
    m64 = copy.deepcopy(m).double()
    torch.testing.assert_close(m64.standardized_weight(), ref, atol=1e-12, rtol=0)


def test_eps_floors_n_var_instead_of_being_added() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    w[0] = 0.7  # constant filter: var = 0 → output 0 (no NaN)
    w[1] = 0.3 + 1e-4 * torch.randn(2, 3, 3, dtype=torch.float64)  # N·var ≈ 1.8e-7 < eps
    gain = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    out = scaled_standardize(w, gain, eps=1e-4)
    torch.testing.assert_close(out, slow_scaled_ws(w, gain, 1e-4, 1.0), atol=1e-12, rtol=0)
    assert out[0].abs().max() < 1e-12  # (W − μ) is rounding noise only; no NaN/inf
    # Floor active: scale is exactly gain/sqrt(eps) = 2/0.01.
    torch.testing.assert_close(out[1], 200.0 * (w[1] - w[1].mean()), atol=1e-12, rtol=0)
    added = gain[1] * (w[1] - w[1].mean()) / torch.sqrt((w[1] - w[1].mean()).square().sum() + 1e-4)
    assert not torch.allclose(out[1], added)  # an additive eps would give something else


def test_standardized_filters_have_zero_mean_and_gain_squared_norm() -> None:
    torch.manual_seed(1)
    m = ScaledStdConv2d(16, 12, 3, gamma=1.5)
    with torch.no_grad():
        m.gain.uniform_(0.2, 3.0)
        m.weight.add_(1.0)
    w_hat = m.standardized_weight().double().flatten(1)
    assert w_hat.mean(1).abs().max() < 1e-6  # fp32 rounding of W − μ with |μ| ≈ 1
    # Σ Ŵ² = N·var(Ŵ) = (gain·γ)² per filter.
    torch.testing.assert_close(
        w_hat.square().sum(1), (m.gain.double() * 1.5) ** 2, rtol=1e-5, atol=0
    )


def test_analytic_backward_matches_autograd() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    w[2] = 0.1 + 1e-5 * torch.randn(3, 3, 3, dtype=torch.float64)  # a floored channel
    w.requires_grad_()
    gain = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w_, g_: scaled_standardize(w_, g_, 1e-4, 1.7), (w, gain))
    assert torch.autograd.gradcheck(lambda w_: scaled_standardize(w_, None, 1e-4), (w,))
    # float32: analytic gradients equal autograd through the same formula written out.
    w32 = torch.randn(8, 4, 3, 3, requires_grad=True)
    g32 = torch.rand(8, requires_grad=True)
    upstream = torch.randn(8, 4, 3, 3)
    ours = torch.autograd.grad(scaled_standardize(w32, g32, 1e-4, 1.3), (w32, g32), upstream)
    c = w32 - w32.mean(dim=(1, 2, 3), keepdim=True)
    var = c.square().mean(dim=(1, 2, 3), keepdim=True)
    plain = c * torch.rsqrt(torch.clamp(var * 36, min=1e-4)) * g32.view(-1, 1, 1, 1) * 1.3
    ref = torch.autograd.grad(plain, (w32, g32), upstream)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("floored", [False, True])
@pytest.mark.parametrize("with_gain", [False, True])
@pytest.mark.parametrize("path", ["cpu", "native", "device"])
def test_eager_forms_equal_the_analytic_function(path: str, floored: bool, with_gain: bool) -> None:
    """The eager forms against the analytic function, float64: ``cpu`` (the default:
    group norm's fused forward and backward with one group per unit, or the separate passes
    and the analytic backward where the floor is active; which ran is asserted) forward to
    1e-14, ``native`` (the C++ kernels of normfree.nn.native) and ``device`` (CUDA's
    sync-free form, batch norm's kernels; run here on the CPU) to rounding; gradients to
    1e-12, and a finite-difference gradcheck of the form itself. The floored unit's
    variance is ~1e-12, far under the floor (eps/N ≈ 3e-6): batch norm's backward alone
    misses its gradient by ~3e-6, so the device form passes by its correction."""
    from normfree.nn import native
    from normfree.nn.ws_functional import (
        _ScaledStandardize,
        _ScaledStandardizeDevice,
        _ScaledStandardizeNative,
    )

    fn = {
        "cpu": scaled_standardize,
        "native": _ScaledStandardizeNative.apply,
        "device": _ScaledStandardizeDevice.apply,
    }[path]
    gen = torch.Generator().manual_seed(int(floored) * 2 + int(with_gain))
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=gen) + 0.3
    if floored:
        w[3] = 0.2 + 1e-6 * torch.randn(4, 3, 3, dtype=torch.float64, generator=gen)
    w.requires_grad_()
    gain = torch.rand(6, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_()
    g = gain if with_gain else None
    upstream = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=gen)
    with native.native_kernels(path == "native") as on:
        if path == "native" and not on:
            pytest.skip("no C++ compiler/OpenMP here: the native kernels cannot be built")
        with torch.profiler.profile() as prof:
            fast = fn(w, g, 1e-4, 1.7)
            fast.backward(upstream, inputs=[w], retain_graph=True)
        ran = {e.name for e in prof.events()}
        fused = {"aten::native_group_norm", "aten::native_group_norm_backward"}
        if path == "device":
            assert "aten::native_batch_norm_backward" in ran and not ran & fused
        elif path == "cpu" and not floored:
            assert fused <= ran
        else:  # a floored unit: group norm's statistics are computed, then the floored forms run
            assert "aten::native_group_norm_backward" not in ran
        w.grad = None
        slow = _ScaledStandardize.apply(w, g, 1e-4, 1.7)
        exact = path == "cpu"
        torch.testing.assert_close(
            fast, slow, rtol=1e-14 if exact else 1e-13, atol=1e-15 if exact else 1e-14
        )
        inputs = (w, gain) if with_gain else (w,)
        for a, b in zip(torch.autograd.grad(fast, inputs, upstream),
                        torch.autograd.grad(slow, inputs, upstream)):  # fmt: skip
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        assert torch.autograd.gradcheck(
            lambda *t: fn(t[0], t[1] if with_gain else None, 1e-4, 1.7), inputs
        )


@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_device_form_without_a_floor_and_for_the_gain_alone(eps: float) -> None:
    """The accelerators' sync-free form (run on the CPU) with ``eps = 0`` (no floor: nothing
    to add back, and no division by it) and with a floor that catches a normal unit; its
    gradients for the weight alone, the gain alone and both equal the analytic function's
    (float64, 1e-12), for a transposed (non-contiguous) weight."""
    from normfree.nn.ws_functional import _ScaledStandardize, _ScaledStandardizeDevice

    gen = torch.Generator().manual_seed(11)
    w = torch.randn(12, 5, dtype=torch.float64, generator=gen).t()  # (5, 12), strided
    if eps > 0.0:
        w = w.clone()
        w[2] *= 1e-2  # N·var ≈ 1.2e-3 < 1e-2: floored
        w = w.t().contiguous().t()
    gain = torch.rand(5, dtype=torch.float64, generator=gen).add_(0.5)
    upstream = torch.randn(5, 12, dtype=torch.float64, generator=gen)
    for wants in ((True, False), (False, True), (True, True)):
        wd, gd = w.clone().requires_grad_(wants[0]), gain.clone().requires_grad_(wants[1])
        wa, ga = w.clone().requires_grad_(wants[0]), gain.clone().requires_grad_(wants[1])
        fast = _ScaledStandardizeDevice.apply(wd, gd, eps, 1.3)
        slow = _ScaledStandardize.apply(wa, ga, eps, 1.3)
        torch.testing.assert_close(fast, slow, rtol=1e-13, atol=1e-14)
        inputs_d = [t for t, want in zip((wd, gd), wants) if want]
        inputs_a = [t for t, want in zip((wa, ga), wants) if want]
        for a, b in zip(torch.autograd.grad(fast, inputs_d, upstream),
                        torch.autograd.grad(slow, inputs_a, upstream)):  # fmt: skip
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_double_backward_of_the_eager_form() -> None:
    """Eager CPU Scaled WS differentiates through group norm, so second derivatives exist
    (gradgradcheck, float64)."""
    torch.manual_seed(0)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    gain = torch.rand(4, dtype=torch.float64).add_(0.5).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda w_, g_: scaled_standardize(w_, g_, 1e-4, 1.3),
                                        (w, gain))  # fmt: skip


@pytest.mark.parametrize("path", ["cpu", "analytic", "native", "device"])
@pytest.mark.parametrize("floored", [False, True])
def test_hessian_vector_product_through_every_form(path: str, floored: bool) -> None:
    """A Hessian-vector product over the weight and gain with ``torch.autograd.grad`` (twice,
    ``create_graph=True``) equals the plain formula's, in every form: the analytic, native
    and device backwards recompute the formula when differentiated twice. They were
    ``once_differentiable``, and ``torch.autograd.grad`` then returned no second derivative
    (None with ``allow_unused=True``, else "appears to not have been used in the graph")."""
    from normfree.nn import native
    from normfree.nn.ws_functional import (
        _scaled_standardize_parts,
        _ScaledStandardize,
        _ScaledStandardizeDevice,
        _ScaledStandardizeNative,
    )

    fn = {
        "cpu": scaled_standardize,
        "analytic": _ScaledStandardize.apply,
        "native": _ScaledStandardizeNative.apply,
        "device": _ScaledStandardizeDevice.apply,
    }[path]
    gen = torch.Generator().manual_seed(int(floored))
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=gen)
    if floored:  # N·var ≈ 3e-7 < eps: the floor is active for this unit
        w[1] *= 1e-4
    w.requires_grad_()
    gain = torch.rand(5, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_()
    v = torch.randn(w.shape, dtype=torch.float64, generator=gen)

    def hvp(f: Callable) -> tuple[torch.Tensor, ...]:
        gw, gg = torch.autograd.grad((f(w, gain, 1e-4, 1.3) * v).square().sum(), (w, gain),
                                     create_graph=True)  # fmt: skip
        return torch.autograd.grad(gw.sum() + gg.sum(), (w, gain), allow_unused=True)

    with native.native_kernels(path == "native") as on:
        if path == "native" and not on:
            pytest.skip("no C++ compiler/OpenMP here: the native kernels cannot be built")
        got = hvp(fn)
        assert torch.autograd.gradgradcheck(lambda *t: fn(*t, 1e-4, 1.3), (w, gain))
    expected = hvp(lambda *t: _scaled_standardize_parts(*t)[0])
    for a, b in zip(got, expected):
        assert a is not None
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_qiao_ws_matches_slow_reference() -> None:
    torch.manual_seed(0)
    m = WSConv2d(6, 4, 3, groups=2, bias=False)
    with torch.no_grad():
        m.weight.mul_(5.0).sub_(1.0)
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    torch.testing.assert_close(
        m.standardized_weight().double(), slow_qiao_ws(m.weight), atol=1e-6, rtol=0
    )
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(
        m(x), _conv(m, x, slow_qiao_ws(m.weight).float()), atol=1e-5, rtol=1e-5
    )
    assert torch.equal(qiao_standardize(m.weight), m.standardized_weight())


# --------------------------------------------------------------------------- init / state


def test_init_and_reset_parameters() -> None:
    torch.manual_seed(0)
    m = ScaledStdConv2d(64, 128, 3, gain_init=0.5)
    assert set(m.state_dict()) == {"weight", "bias", "gain"}
    assert m.gain.shape == (128,)
    assert torch.equal(m.gain, torch.full((128,), 0.5))
    assert torch.equal(m.bias, torch.zeros(128))
    n = 64 * 9
    assert abs(m.weight.var().item() * n - 1.0) < 0.02  # 73k samples of N(0, 1/N)
    assert abs(m.weight.mean().item()) < 0.01 / math.sqrt(n) * 10
    with torch.no_grad():
        m.weight.fill_(3.0)
        m.gain.fill_(9.0)
        m.bias.fill_(1.0)
    m.reset_parameters()
    assert torch.equal(m.gain, torch.full((128,), 0.5)) and m.bias.abs().sum() == 0
    assert abs(m.weight.var().item() * n - 1.0) < 0.02
    assert ScaledStdConv2d(2, 3, 3, bias=False).bias is None


def test_signal_propagation_chain_keeps_mean_zero_variance_one() -> None:
    """10 × (γ-ReLU → ScaledStdConv2d) on N(0,1) input (Brock et al. 2021a, §4.1)."""
    torch.manual_seed(0)
    channels = 32
    layers = [ScaledStdConv2d(channels, channels, 3) for _ in range(10)]
    x = torch.randn(16, channels, 32, 32)
    with torch.no_grad():
        h = layers[0](x)
        for layer in layers[1:]:
            h = layer(torch.relu(h) * RELU_GAMMA)
    inner = h[:, :, 10:-10, 10:-10]  # away from the zero-padded border (receptive field 21)
    means = inner.mean(dim=(0, 2, 3))
    variances = inner.var(dim=(0, 2, 3))
    assert means.abs().max() < 0.25  # per channel; no mean shift builds up
    assert abs(means.mean().item()) < 0.05
    assert 0.85 < variances.mean().item() < 1.15
    assert 0.6 < variances.min().item() and variances.max().item() < 1.5


# --------------------------------------------------------------------------- inference cache


def _counting(m: StdConv2dBase) -> list[int]:
    calls = [0]
    original = m.standardize

    def counted(weight: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return original(weight)

    m.standardize = counted  # type: ignore[method-assign]
    return calls


def test_eval_cache_identical_outputs_and_reuse() -> None:
    torch.manual_seed(0)
    m = ScaledStdConv2d(4, 6, 3, stride=2).eval()
    x = torch.randn(2, 4, 9, 8)
    no_cache = m(x)  # grad enabled, params require grad → no cache
    assert m._ws_cache is None and no_cache.requires_grad
    calls = _counting(m)
    with torch.no_grad():
        outs = [m(x) for _ in range(3)]
    with torch.inference_mode():
        inf = m(x)
    assert calls[0] == 2  # once under no_grad, once under inference_mode
    for out in [*outs, inf]:
        assert torch.equal(out, no_cache.detach())
    assert "_ws_cache" not in str(m.state_dict().keys())
    # Leaving inference mode with frozen params and an input that needs grad still works.
    m.requires_grad_(False)
    xg = x.clone().requires_grad_()
    m(xg).sum().backward()
    assert xg.grad is not None and calls[0] == 3
    # A grad-enabled forward drops the cache (no stale copy kept while training).
    m.requires_grad_(True)
    m(x)
    assert m._ws_cache is None


def test_autocast_evaluation_caches_the_weight_in_autocast_dtype() -> None:
    # under CPU autocast the cached weight is kept in bfloat16, the cast the convolution would
    # make on every call made once: bit for bit the output of the float32 weight that autocast
    # casts; leaving autocast caches the float32 weight again
    torch.manual_seed(0)
    m = ScaledStdConv2d(4, 6, 3, stride=2).eval()
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        w32, b = m.effective_weight_bias()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = m._conv(x, w32, b)
            first = m(x)
            cached = m._ws_cache[1][0]
            second = m(x)
            assert m._ws_cache[1][0] is cached  # reused
        plain = m(x)
    assert cached.dtype == torch.bfloat16 and torch.equal(cached, w32.bfloat16())
    assert ref.dtype == torch.bfloat16 and torch.equal(first, ref) and torch.equal(second, ref)
    assert m._ws_cache[1][0].dtype == torch.float32 and torch.equal(plain, m._conv(x, w32, b))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, foreach=False),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
        lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
    ],
)
def test_cache_invalidated_by_optimizer_step(
    make_opt: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
) -> None:
    torch.manual_seed(0)
    m = ScaledStdConv2d(3, 5, 3)
    opt = make_opt(m.parameters())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        before = m(x)
    m(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        after = m(x)
        fresh = _conv(m, x, slow_scaled_ws(m.weight, m.gain, 1e-4, 1.0).float())
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh, atol=1e-5, rtol=1e-5)


def test_cache_invalidated_by_load_state_dict_inplace_edit_and_to() -> None:
    torch.manual_seed(0)
    a, b = ScaledStdConv2d(3, 4, 3), ScaledStdConv2d(3, 4, 3)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        out_b = b(x)
        a(x)
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), out_b)
        a.gain.mul_(2.0)  # in-place edit bumps the version counter
        torch.testing.assert_close(
            a(x) - a.bias.view(1, -1, 1, 1), 2 * (out_b - b.bias.view(1, -1, 1, 1))
        )
        a64 = a.to(torch.float64)
        y64 = a64(x.double())
        assert y64.dtype == torch.float64
        torch.testing.assert_close(
            y64, _conv(a64, x.double(), slow_scaled_ws(a64.weight, a64.gain, 1e-4, 1.0))
        )
        a.to(torch.float32)
        torch.testing.assert_close(a(x), y64.float(), atol=1e-5, rtol=1e-5)


def test_cache_not_copied_or_pickled() -> None:
    m = ScaledStdConv2d(2, 3, 3).eval()
    with torch.no_grad():
        m(torch.randn(1, 2, 4, 4))
    assert m._ws_cache is not None
    assert copy.deepcopy(m)._ws_cache is None
    assert pickle.loads(pickle.dumps(m))._ws_cache is None
    m.clear_weight_cache()
    assert m._ws_cache is None


def _reference_agc(params: list[torch.Tensor], grads: list[torch.Tensor], clipping: float):
    """Eq. 3 of Brock et al. 2021b, unit by unit from the current weights (ε = 1e-3)."""
    out = []
    for p, g in zip(params, grads):
        dims = tuple(range(1, p.ndim))
        w_norm = torch.linalg.vector_norm(p.detach(), dim=dims or None, keepdim=True)
        g_norm = torch.linalg.vector_norm(g, dim=dims or None, keepdim=True)
        max_norm = clipping * w_norm.clamp_min(1e-3)
        out.append(torch.where(g_norm > max_norm, g * max_norm / g_norm.clamp_min(1e-6), g))
    return out


def test_clear_caches_after_writes_through_a_shared_vector() -> None:
    """Parameters set to views of a flat vector (``vector_to_parameters``), the vector written
    in place and set again: nothing PyTorch counts changes, so the cached weight and the
    forward's unit statistics are stale until ``clear_caches``, which makes the output and AGC
    equal the formulas again."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from normfree.nn import clear_caches
    from normfree.optim import adaptive_clip_grad_

    torch.manual_seed(0)
    conv = ScaledStdConv2d(4, 4, 3).eval()
    x = torch.randn(2, 4, 6, 6)
    vec = parameters_to_vector(conv.parameters()).clone()
    vector_to_parameters(vec, conv.parameters())
    with torch.no_grad():
        conv(x)  # fills the cache
    vec[: conv.weight.numel()].mul_(torch.linspace(0.5, 3.0, conv.weight.numel()))
    vector_to_parameters(vec, conv.parameters())
    fresh = _conv(conv, x, slow_scaled_ws(conv.weight, conv.gain, 1e-4, 1.0).float())
    with torch.no_grad():
        assert (conv(x) - fresh).abs().max() > 0.1  # stale: what the docstring warns of
        clear_caches(conv)
        torch.testing.assert_close(conv(x), fresh, rtol=1e-5, atol=1e-5)

    conv.train()
    conv(x).square().sum().backward()  # the forward keeps the unit statistics AGC reads
    vec[: conv.weight.numel()].mul_(3.0)
    vector_to_parameters(vec, conv.parameters())
    params = list(conv.parameters())
    expected = _reference_agc(params, [p.grad.clone() for p in params], 0.01)
    clear_caches(conv)
    adaptive_clip_grad_(params, 0.01)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


def test_parameters_stay_swappable_after_forwards_and_clipping() -> None:
    """What normfree keeps per parameter holds no weak reference to it, so PyTorch's
    ``swap_tensors`` (``Module.to()``/``load_state_dict`` under the swap flag, FSDP2) works
    after training and evaluation forwards and AGC, and nothing stale is read after a swap."""
    from normfree.models import create_model
    from normfree.optim import adaptive_clip_grad_

    torch.manual_seed(0)
    model = create_model("nf_resnet_cifar20", num_classes=3)
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    adaptive_clip_grad_(model.parameters(), 0.01)
    with torch.no_grad():
        model.eval()(x)  # fills every inference cache
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.double()
        model.load_state_dict(model.state_dict())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    conv = model.stem.conv
    torch.utils.swap_tensors(conv.weight, nn.Parameter(conv.weight.detach() * 2))
    with torch.no_grad():
        got = conv(x.double())
    torch.testing.assert_close(
        got, _conv(conv, x.double(), slow_scaled_ws(conv.weight, conv.gain, conv.eps, conv.gamma))
    )


def test_train_mode_drops_the_cache() -> None:
    m = ScaledStdConv2d(2, 3, 3).eval()
    with torch.no_grad():
        m(torch.randn(1, 2, 4, 4))
    m.eval()  # eval() keeps it
    assert m._ws_cache is not None
    nn.Sequential(m).train()  # as model.train() reaches every conv
    assert m._ws_cache is None


@pytest.mark.parametrize("cls", [ScaledStdConv2d, WSConv2d])
def test_eager_evaluation_does_not_recompile_a_compiled_training_step(cls: type) -> None:
    """A compiled forward neither reads nor drops the eager cache: an eager evaluation between
    compiled training steps (as ``normfree train --compile`` evaluates) must not invalidate the
    compiled graph, and the cache it leaves behind is rebuilt after the next step (its key)."""
    torch.compiler.reset()
    torch.manual_seed(0)
    m = cls(3, 4, 3, stride=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    graphs: list[str] = []
    compiled = torch.compile(m, backend=graphs_seen(graphs), fullgraph=True)
    x = torch.randn(2, 3, 7, 7)
    for step in range(3):
        opt.zero_grad()
        compiled(x).square().mean().backward()
        assert (m._ws_cache is None) == (step == 0)  # the compiled step left the cache alone
        opt.step()
        with torch.no_grad():
            cached = m(x)  # eager: the stale cache is rebuilt for the new weights
            if isinstance(m, ScaledStdConv2d):
                reference = slow_scaled_ws(m.weight, m.gain, m.eps, m.gamma)
            else:
                reference = slow_qiao_ws(m.weight, m.eps)
            fresh = _conv(m, x, reference.float())
        torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1  # the first eager evaluation used to force a second compile

# --------------------------------------------------------------------------- padding / layout


@pytest.mark.parametrize(
    ("size", "stride", "dilation"), [(8, 2, 1), (7, 2, 1), (8, 1, 2), (9, 1, 1)]
)
def test_same_padding_equals_manual_pad(size: int, stride: int, dilation: int) -> None:
    torch.manual_seed(0)
    m = ScaledStdConv2d(3, 4, 3, stride=stride, dilation=dilation)
    x = torch.randn(2, 3, size, size + 1)
    pads_h = (0, 1) if size % 2 == 0 else (1, 1)
    pads_w = (0, 1) if (size + 1) % 2 == 0 else (1, 1)
    if stride == 1:
        pads_h = pads_w = (dilation, dilation)
    padded = F.pad(x, (*pads_w, *pads_h))
    ref = F.conv2d(padded, m.standardized_weight(), m.bias, stride, 0, dilation)
    torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=1e-6)
    assert m.dynamic_padding == (stride == 2)


def test_integer_padding_like_nn_conv2d() -> None:
    m = ScaledStdConv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(1, 3, 8, 8)
    ref = F.conv2d(x, m.standardized_weight(), m.bias, 2, 1)
    torch.testing.assert_close(m(x), ref)
    assert ScaledStdConv2d(3, 4, 3, padding="valid")(x).shape[-1] == 6


def test_channels_last() -> None:
    torch.manual_seed(0)
    m = ScaledStdConv2d(8, 8, 3, stride=2)
    x = torch.randn(2, 8, 10, 10)
    ref = m(x)
    ref.sum().backward()
    grad_ref = m.weight.grad.clone()
    m.zero_grad()
    m_cl = m.to(memory_format=torch.channels_last)
    out = m_cl(x.to(memory_format=torch.channels_last))
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m_cl.weight.grad, grad_ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(m_cl(x.to(memory_format=torch.channels_last)), ref)


def test_autocast_bf16_standardizes_in_fp32() -> None:
    torch.manual_seed(0)
    m = ScaledStdConv2d(8, 8, 3)
    x = torch.randn(2, 8, 6, 6)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = m.standardized_weight()
        out = m(x)
    assert w.dtype == torch.float32 and torch.equal(w, m.standardized_weight())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert m.weight.grad is not None and m.weight.grad.dtype == torch.float32
    # bf16 weights: statistics in fp32, result cast back.
    mb = copy.deepcopy(m).to(torch.bfloat16)
    expected = scaled_standardize(mb.weight.float(), mb.gain.float()).to(torch.bfloat16)
    assert torch.equal(mb.standardized_weight(), expected)


# --------------------------------------------------------------------------- folding / export


def _small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        ScaledStdConv2d(3, 8, 3, stride=2),
        nn.ReLU(),
        nn.Sequential(WSConv2d(8, 8, 3, bias=False), nn.GroupNorm(2, 8)),
        ScaledStdConv2d(8, 4, 1, gamma=RELU_GAMMA),
    ).eval()


def test_to_conv2d_same_outputs() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 9)
    for m in (
        ScaledStdConv2d(3, 5, 3),
        ScaledStdConv2d(3, 5, 3, stride=2, bias=False),
        WSConv2d(3, 6, 5, groups=3),
    ):
        conv = m.to_conv2d()
        assert type(conv) is (Conv2dSame if m.dynamic_padding else nn.Conv2d)
        assert isinstance(conv, nn.Conv2d) and (conv.bias is None) == (m.bias is None)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), m(x), atol=1e-6, rtol=1e-6)


def test_fold_weight_standardization_model() -> None:
    model = _small_model()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
        folded = fold_weight_standardization(model)
        assert not any(isinstance(mod, StdConv2dBase) for mod in folded.modules())
        assert any(isinstance(mod, StdConv2dBase) for mod in model.modules())  # copy by default
        torch.testing.assert_close(folded(x), ref, atol=1e-6, rtol=1e-6)
        same = fold_weight_standardization(model, inplace=True)
        assert same is model and not any(isinstance(mod, StdConv2dBase) for mod in model.modules())
    assert isinstance(fold_weight_standardization(ScaledStdConv2d(2, 2, 1)), nn.Conv2d)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fold_weight_standardization("model")  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_script_and_trace() -> None:
    model = _small_model()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), ref)
    y = scripted(x)
    y.sum().backward()  # the scripted graph is differentiable
    assert model[0].gain.grad is not None
    traced = torch.jit.trace(model, x)
    with torch.no_grad():
        model[0].gain.mul_(2.0)  # the trace reads the parameters, it did not bake the weight in
        torch.testing.assert_close(traced(x), model(x))


def test_torch_compile_smoke() -> None:
    model = _small_model().train()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    ref.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings(
    "ignore::UserWarning",
    "ignore::DeprecationWarning",
    "ignore::FutureWarning",
    "ignore::torch.jit.TracerWarning",
)
def test_onnx_export_of_folded_model() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    model = _small_model()
    x = torch.randn(1, 3, 8, 8)
    folded = fold_weight_standardization(model)
    buffer = io.BytesIO()
    torch.onnx.export(folded, (x,), buffer, dynamo=False, input_names=["x"])
    proto = onnx.load_from_string(buffer.getvalue())
    assert {"Conv", "Pad"} <= {node.op_type for node in proto.graph.node}
    (out,) = ReferenceEvaluator(proto).run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- errors


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="padding must be 'same'"):
        ScaledStdConv2d(4, 4, 3, padding="full")
    with pytest.raises(ValueError, match="divisible by groups"):
        ScaledStdConv2d(5, 4, 3, groups=2)
    with pytest.raises(ValueError, match="kernel_size"):
        ScaledStdConv2d(4, 4, 0)
    with pytest.raises(ValueError, match="in_channels"):
        ScaledStdConv2d(0, 4, 3)
    with pytest.raises(ValueError, match="eps"):
        ScaledStdConv2d(4, 4, 3, eps=0.0)
    with pytest.raises(ValueError, match="fan-in"):
        WSConv2d(4, 4, 1, groups=4)
    with pytest.raises(ValueError, match="gain must have shape"):
        scaled_standardize(torch.randn(4, 2, 3, 3), torch.ones(3))
    with pytest.raises(ValueError, match=">= 2 dims"):
        scaled_standardize(torch.randn(4))
    with pytest.raises(ValueError, match="gain_init must be a finite number, got nan"):
        ScaledStdConv2d(4, 4, 3, gain_init=float("nan"))


@pytest.mark.parametrize(
    ("weight_dtype", "gain_dtype"), [(torch.float64, torch.float32), (torch.float32, torch.float64)]
)
def test_eager_form_with_a_gain_of_another_dtype(
    weight_dtype: torch.dtype, gain_dtype: torch.dtype
) -> None:
    """The fused group-norm kernel needs one dtype; the gain is cast to the weight's, which is
    the result's dtype, and each input gets a gradient of its own dtype."""
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3, dtype=weight_dtype, requires_grad=True)
    gain = torch.rand(5, dtype=gain_dtype).add_(0.5).requires_grad_()
    out = scaled_standardize(w, gain, 1e-4, 1.3)
    assert out.dtype == weight_dtype
    ref = slow_scaled_ws(w.detach().double(), gain.detach().double(), 1e-4, 1.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)
    out.sum().backward()
    assert w.grad.dtype == weight_dtype and gain.grad.dtype == gain_dtype


@pytest.mark.parametrize("shape", [(0, 3, 3, 3), (4, 0, 3, 3)])
def test_empty_weights_standardize_to_empty(shape: tuple[int, ...]) -> None:
    w = torch.randn(*shape, requires_grad=True)
    out = scaled_standardize(w)
    assert out.shape == w.shape
    out.sum().backward()
    assert w.grad.shape == w.shape


class _ScaledCall(nn.Module):
    """A conv called with folded scales, as NF residual blocks call it."""

    def __init__(self, conv: ScaledStdConv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv.forward_scaled(x, 2.0, 0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_func_grad_of_a_scaled_conv_keeps_the_weight_dtype(dtype) -> None:
    # torch.func over a conv with folded scales: the formula's branch hands the conv its
    # weight in the dtype asked for (the bfloat16 parameters', or under CPU autocast
    # bfloat16 for float32 ones), and the gradients equal autograd's
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    net = _ScaledCall(ScaledStdConv2d(3, 4, 3)).to(dtype)
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": dtype == torch.float32}

    def loss(p: dict) -> torch.Tensor:
        with torch.autocast(**autocast):
            return functional_call(net, p, (x,)).float().square().sum()

    got = grad(loss)(params)
    with torch.autocast(**autocast):
        out = net(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    for name, p in net.named_parameters():
        assert got[name].dtype == dtype
        torch.testing.assert_close(got[name], p.grad)


def test_torch_func_grad_and_per_sample_gradients_through_scaled_ws() -> None:
    """``torch.func.grad`` and ``vmap`` (per-sample gradients) run through the eager-CPU Scaled
    WS (group norm's autograd node; the former ``autograd.Function`` had no ``setup_context``
    and raised) and equal autograd's gradients, float64."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    net = nn.Sequential(ScaledStdConv2d(3, 4, 3), nn.ReLU(), ScaledStdConv2d(4, 5, 1),
                        nn.Flatten(), nn.Linear(5 * 64, 2)).double()  # fmt: skip
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)

    def loss(p: dict, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(net, p, (xb,)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
    for i in range(x.shape[0]):
        net.zero_grad()
        net(x[i : i + 1]).square().sum().backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)
    total = grad(loss)(params, x)
    torch.testing.assert_close(total["0.gain"], per_sample["0.gain"].sum(0), rtol=1e-10, atol=1e-12)
