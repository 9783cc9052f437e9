"""Shared plain convs (normfree.nn.conv): He-normal init statistics, padding, width rule."""

from __future__ import annotations

import math

import pytest
import torch

from normfree.nn import HeConv2d, grouped_width


@pytest.mark.parametrize(
    ("mode", "fan"), [("fan_in", 64 * 9), ("fan_out", 128 * 9)], ids=["fan_in", "fan_out"]
)
def test_he_conv_weight_std_follows_its_fan(mode: str, fan: int) -> None:
    torch.manual_seed(0)
    conv = HeConv2d(64, 128, 3, stride=2, mode=mode)
    # 73,728 samples of N(0, 2/fan): the sample std is within 1% of sqrt(2/fan)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan), rel=0.01)
    assert conv.bias is not None and torch.count_nonzero(conv.bias) == 0
    assert conv.padding == (1, 1) and conv.stride == (2, 2)
    assert HeConv2d(8, 8, 1, bias=False).bias is None


def test_he_conv_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        HeConv2d(8, 16, 3, mode="fan_avg")


def test_grouped_width_rounds_down_to_whole_groups() -> None:
    assert grouped_width(1536, 0.5, 128) == (768, 6)
    assert grouped_width(384, 0.5, 128) == (128, 1)  # int(192) // 128 = 1 group (NFNet-F+ stage 1)
    with pytest.raises(ValueError, match="no group left"):
        grouped_width(64, 0.5, 128)


# ------------------------------------------------------------- strided 1×1 (transition shortcuts)
@pytest.mark.parametrize("stride,size", [((2, 2), 8), ((2, 2), 7), ((3, 2), 10), ((1, 2), 5)])
def test_strided_pointwise_equals_the_strided_conv(stride: tuple[int, int], size: int) -> None:
    import torch.nn.functional as F

    from normfree.nn.pointwise_conv import strided_pointwise_conv2d

    gen = torch.Generator().manual_seed(size)
    x = torch.randn(2, 6, size, size + 1, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    ours = strided_pointwise_conv2d(x, w, b, stride, 2)
    plain = F.conv2d(x, w, b, stride, 0, 1, 2)
    assert torch.equal(ours, plain)  # the same products, one per output
    up = torch.randn(plain.shape, dtype=torch.float64, generator=gen)
    for a, c in zip(torch.autograd.grad(ours, (x, w, b), up),
                    torch.autograd.grad(plain, (x, w, b), up)):  # fmt: skip
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_ws_shortcut_conv_takes_the_subsampled_path() -> None:
    from normfree.nn import ScaledStdConv2d

    conv = ScaledStdConv2d(8, 16, 1, stride=2).double()
    assert conv.strided_pointwise and not ScaledStdConv2d(8, 16, 3, stride=2).strided_pointwise
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64, requires_grad=True)
    expected = torch.nn.functional.conv2d(x, conv.standardized_weight(), conv.bias, 2)
    ours = conv(x)  # the subsample in the matrix form of normfree.nn.pointwise_conv
    assert ours.grad_fn.name() == "PointwiseConvFunctionBackward"
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(expected)
    wrt = (x, conv.weight, conv.gain, conv.bias)
    for a, b in zip(torch.autograd.grad(ours, wrt, up), torch.autograd.grad(expected, wrt, up)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    gm = torch.fx.symbolic_trace(conv)  # one leaf call, no branch on the traced input
    assert any(n.target.__name__ == "strided_pointwise_conv2d" for n in gm.graph.nodes
               if n.op == "call_function")  # fmt: skip
    torch.testing.assert_close(gm(x), expected, rtol=1e-12, atol=1e-12)
