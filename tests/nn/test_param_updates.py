"""Caches that key on parameters (the Scaled-WS inference cache, the unit statistics AGC reads)
against updates the version counter misses: fused optimizer steps, ``.data`` assignment,
``Module.to``; and the tensors they must not cache at all (inference tensors, ``torch.func``
transforms, forward-AD duals). Reference values are recomputed from the weights directly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwad
from torch.func import functional_call, jvp, vmap

from normfree.nn import ScaledStdConv2d, scaled_standardize
from normfree.nn.param_updates import optimizer_steps, tensor_key
from normfree.nn.unit_norms import unit_norm_from_forward
from normfree.optim import adaptive_clip_grad_
from normfree.optim.fused import fused_available


def _fresh(m: ScaledStdConv2d, x: torch.Tensor) -> torch.Tensor:
    weight = scaled_standardize(m.weight.detach(), m.gain.detach(), m.eps, m.gamma)
    return F.conv2d(x, weight, m.bias.detach(), m.stride, m.padding)


def _set_grads(m: torch.nn.Module) -> None:
    for p in m.parameters():
        p.grad = torch.randn_like(p)


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.AdamW])
def test_fused_step_between_two_evaluations_invalidates_the_cache(cls: type) -> None:
    # PyTorch's fused kernels update parameters without bumping their version: the cache keys
    # on the optimizer steps taken as well
    if not fused_available(cls, [torch.zeros(1)]):
        pytest.skip(f"no fused CPU {cls.__name__} in torch {torch.__version__}")
    torch.manual_seed(0)
    m = ScaledStdConv2d(3, 4, 3, padding=1).eval()
    opt = cls(m.parameters(), lr=0.5, fused=True)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        before = m(x)
    version, steps = m.weight._version, optimizer_steps()
    _set_grads(m)
    opt.step()
    assert m.weight._version == version  # the PyTorch behaviour this guards against
    assert optimizer_steps() == steps + 1
    with torch.no_grad():
        after = m(x)
    assert (after - before).abs().max() > 0.1
    torch.testing.assert_close(after, _fresh(m, x), rtol=1e-5, atol=1e-5)


def test_unit_statistics_are_not_read_after_updates_the_version_misses() -> None:
    torch.manual_seed(0)
    m = ScaledStdConv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6)
    m(x)
    direct = torch.linalg.vector_norm(m.weight.detach().flatten(1), dim=1)
    torch.testing.assert_close(unit_norm_from_forward(m.weight), direct, rtol=1e-5, atol=1e-6)
    torch.optim.SGD(m.parameters(), lr=0.1).step()  # no gradients: an optimizer step all the same
    assert unit_norm_from_forward(m.weight) is None
    m(x)
    with torch.no_grad():
        m.weight.data = m.weight.data * 2.0  # new memory, version unchanged
    assert unit_norm_from_forward(m.weight) is None
    m(x)
    m.double()  # same Parameter object, new dtype and memory
    assert unit_norm_from_forward(m.weight) is None


def test_agc_clips_with_the_current_weights_after_a_fused_step() -> None:
    # a forward that keeps no statistics (here: none at all after the step) must not leave AGC
    # reading those of the weights before the step
    if not fused_available(torch.optim.SGD, [torch.zeros(1)]):
        pytest.skip("no fused CPU SGD")
    torch.manual_seed(0)
    m = ScaledStdConv2d(3, 4, 3)
    m(torch.randn(2, 3, 6, 6))  # keeps statistics of the current weights
    with torch.no_grad():
        for p in m.parameters():
            p.grad = 5.0 * p  # a step that scales every weight by 1 - 0.5·5 = -1.5
    torch.optim.SGD(m.parameters(), lr=0.5, fused=True).step()
    grad = torch.randn_like(m.weight) * 10.0
    m.weight.grad = grad.clone()
    adaptive_clip_grad_([m.weight], clipping=0.01)
    w = m.weight.detach().flatten(1)
    max_norm = 0.01 * torch.linalg.vector_norm(w, dim=1).clamp_min(1e-3)
    g_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1)
    expected = grad * (max_norm / g_norm).clamp(max=1.0).view(-1, 1, 1, 1)
    torch.testing.assert_close(m.weight.grad, expected, rtol=1e-6, atol=1e-7)


def test_half_weight_statistics_do_not_overflow() -> None:
    # rsqrt(var) of a half weight with std 0.003 is ~333 and its square overflows float16
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        w = torch.nn.Parameter((torch.randn(3, 64) * 0.003).to(dtype))
        scaled_standardize(w, None, 1e-4, 1.0)
        direct = torch.linalg.vector_norm(w.detach().float(), dim=1)
        torch.testing.assert_close(unit_norm_from_forward(w).float(), direct, rtol=1e-2, atol=0)


def test_modules_built_in_inference_mode_evaluate() -> None:
    torch.manual_seed(0)
    with torch.inference_mode():
        m = ScaledStdConv2d(3, 4, 3).eval()
        x = torch.randn(1, 3, 8, 8)
        first, second = m(x), m(x)
        assert m.weight.is_inference()
        torch.testing.assert_close(first, _fresh(m, x))
        torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_the_cache_key_holds_the_formula_and_the_layout() -> None:
    torch.manual_seed(0)
    m = ScaledStdConv2d(4, 4, 1).eval()
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        m(x)
        m.gamma = 3.0
        torch.testing.assert_close(m(x), _fresh(m, x), rtol=1e-5, atol=1e-5)
        m.eps = 10.0
        torch.testing.assert_close(m(x), _fresh(m, x), rtol=1e-5, atol=1e-5)
        transposed = m.weight.transpose(0, 1)  # same memory and version, another layout
        assert tensor_key(transposed) != tensor_key(m.weight)
        out = functional_call(m, {"weight": transposed}, (x,))
        weight = scaled_standardize(transposed, m.gain, m.eps, m.gamma)
        torch.testing.assert_close(out, F.conv2d(x, weight, m.bias), rtol=1e-5, atol=1e-5)


def test_torch_func_over_the_weights_and_forward_ad_duals() -> None:
    torch.manual_seed(0)
    m = ScaledStdConv2d(4, 4, 1).eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    m.double()
    params = {k: v.detach() for k, v in m.named_parameters()}

    def reference(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.conv2d(x, scaled_standardize(p["weight"], p["gain"], m.eps, m.gamma), p["bias"])

    tangent = torch.randn_like(params["weight"])
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            got = jvp(lambda w: functional_call(m, {**params, "weight": w}, (x,)),
                      (params["weight"],), (tangent,))[1]  # fmt: skip
            want = jvp(lambda w: reference({**params, "weight": w}), (params["weight"],),
                       (tangent,))[1]  # fmt: skip
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
            stacked = {k: torch.stack([v, 2.0 * v]) for k, v in params.items()}
            got = vmap(lambda p: functional_call(m, p, (x,)))(stacked)
            torch.testing.assert_close(got, vmap(reference)(stacked), rtol=1e-10, atol=1e-10)
    # duals of the weight with two tangents in turn: the second is not the first's cache
    m.requires_grad_(False)
    outputs = []
    with torch.no_grad(), fwad.dual_level():
        for scale in (1.0, 2.0):
            weight = m.weight
            dual = fwad.make_dual(weight.detach(), torch.ones_like(weight) * scale)
            outputs.append(fwad.unpack_dual(functional_call(m, {"weight": dual}, (x,))).tangent)
    torch.testing.assert_close(outputs[1], 2.0 * outputs[0], rtol=1e-10, atol=1e-10)


def test_a_parameter_listed_twice_is_clipped_once() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    grad = torch.randn_like(w) * 10.0
    w.grad = grad.clone()
    adaptive_clip_grad_([w], clipping=0.01)
    once = w.grad.clone()
    w.grad = grad.clone()
    adaptive_clip_grad_([w, w], clipping=0.01)
    torch.testing.assert_close(w.grad, once, rtol=0, atol=0)


def test_floor_found_next_to_a_nan_unit() -> None:
    # a constant unit is floored (its output is 0) even when another unit of the weight is NaN
    w = torch.randn(3, 8, dtype=torch.float64)
    w[1] = 0.5
    w[2, 0] = float("nan")
    out = scaled_standardize(w, None, 1e-4, 1.0)
    assert torch.equal(out[1], torch.zeros(8, dtype=torch.float64))
    assert torch.isnan(out[2]).all() and torch.isfinite(out[0]).all()


def test_gain_of_another_dtype_gives_the_weights_dtype_on_every_path() -> None:
    w = torch.randn(3, 8, requires_grad=True)
    with torch.no_grad():
        w[1] = 0.5  # floored: the analytic path with autograd
    gain = torch.ones(3, dtype=torch.float64)
    assert scaled_standardize(w, gain).dtype == torch.float32
    with torch.no_grad():
        assert scaled_standardize(w, gain).dtype == torch.float32


def test_a_strided_1x1_conv_takes_an_unbatched_input() -> None:
    torch.manual_seed(0)
    m = ScaledStdConv2d(4, 8, 1, stride=2)
    x = torch.randn(4, 6, 6)
    want = F.conv2d(x, m.standardized_weight().detach(), m.bias.detach(), 2)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)


def test_a_1x1_conv_changed_after_construction_takes_its_new_form() -> None:
    # model surgery (e.g. a stride moved to another layer) changes conv attributes in place
    torch.manual_seed(0)
    m = ScaledStdConv2d(4, 5, 1)
    x = torch.randn(2, 4, 6, 6)
    weight, bias = m.standardized_weight().detach(), m.bias.detach()
    m.stride = (2, 2)
    torch.testing.assert_close(m(x), F.conv2d(x, weight, bias, 2), rtol=1e-5, atol=1e-6)
    m.stride, m.padding = (1, 1), (1, 1)
    torch.testing.assert_close(m(x), F.conv2d(x, weight, bias, 1, 1), rtol=1e-5, atol=1e-6)


def test_tanh_gelu_under_forward_ad_and_vmap() -> None:
    # the fast Function has no jvp / vmap rule: duals and torch.func take nn.GELU's op
    from normfree.nn.activations import TanhGELU

    gelu = TanhGELU()
    x = torch.randn(3, 5, dtype=torch.float64)
    t = torch.randn_like(x)
    with fwad.dual_level():
        tangent = fwad.unpack_dual(gelu(fwad.make_dual(x, t))).tangent
    want = jvp(lambda v: F.gelu(v, approximate="tanh"), (x,), (t,))[1]
    torch.testing.assert_close(tangent, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vmap(gelu)(x), F.gelu(x, approximate="tanh"), rtol=1e-12, atol=0)


def test_moments_propagate_through_a_gelu_nfnet() -> None:
    from normfree.analysis import propagate_moments
    from normfree.models.nfnet import NFNet

    torch.manual_seed(0)
    model = NFNet(depths=(1, 1, 1, 1), widths=(16, 32, 32, 32), group_size=8,
                  stem_channels=(4, 8, 8), num_classes=3)  # fmt: skip
    result = propagate_moments(model, input_shape=(3, 32, 32), batch_size=2)
    assert len(result.points) > 2
