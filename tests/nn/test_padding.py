"""TF/JAX "SAME" padding helpers (normfree.nn.padding)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from normfree.nn.padding import (
    Conv2dSame,
    conv_pair,
    pad_same,
    resolve_padding,
    same_padding_amounts,
    static_same_padding,
)


def _tf_same_total(in_size: int, kernel: int, stride: int, dilation: int) -> int:
    """TensorFlow's documented rule (tf.nn.convolution docs), written independently."""
    k_eff = (kernel - 1) * dilation + 1
    if in_size % stride == 0:
        return max(k_eff - stride, 0)
    return max(k_eff - in_size % stride, 0)


@pytest.mark.parametrize(
    ("in_size", "kernel", "stride", "dilation", "expected"),
    [
        (8, 3, 2, 1, (0, 1)),  # strided conv on an even input: the extra pixel goes after
        (7, 3, 2, 1, (1, 1)),
        (224, 3, 1, 1, (1, 1)),
        (224, 7, 2, 1, (2, 3)),  # ResNet stem on 224²
        (8, 1, 2, 1, (0, 0)),
        (6, 4, 1, 1, (1, 2)),  # even kernel, stride 1
        (9, 3, 1, 2, (2, 2)),  # dilation 2 → effective 5
        (1, 3, 2, 1, (1, 1)),
    ],
)
def test_same_padding_amounts_known_values(
    in_size: int, kernel: int, stride: int, dilation: int, expected: tuple[int, int]
) -> None:
    assert same_padding_amounts(in_size, kernel, stride, dilation) == expected


def test_same_padding_amounts_matches_tf_rule_and_output_size() -> None:
    for in_size, kernel, stride, dilation in itertools.product(
        range(1, 20), range(1, 8), range(1, 5), range(1, 4)
    ):
        before, after = same_padding_amounts(in_size, kernel, stride, dilation)
        assert before + after == _tf_same_total(in_size, kernel, stride, dilation)
        assert after - before in (0, 1)  # extra pixel after, never before
        k_eff = (kernel - 1) * dilation + 1
        out = (in_size + before + after - k_eff) // stride + 1
        assert out == math.ceil(in_size / stride)


def test_static_same_padding_only_when_input_independent() -> None:
    assert static_same_padding((3, 3), (1, 1), (1, 1)) == (1, 1)
    assert static_same_padding((5, 3), (1, 1), (1, 2)) == (2, 2)
    assert static_same_padding((1, 1), (2, 2), (1, 1)) == (0, 0)
    assert static_same_padding((3, 3), (2, 2), (1, 1)) is None
    assert static_same_padding((4, 4), (1, 1), (1, 1)) is None
    assert static_same_padding((3, 1), (2, 1), (1, 1)) is None
    # Whenever it answers, the answer is "SAME" for every input size.
    for k, s, d in itertools.product(range(1, 6), range(1, 4), range(1, 3)):
        static = static_same_padding((k, k), (s, s), (d, d))
        amounts = {same_padding_amounts(n, k, s, d) for n in range(1, 30)}
        if static is not None:
            assert amounts == {(static[0], static[0])}
        else:
            assert len(amounts) > 1 or next(iter(amounts))[0] != next(iter(amounts))[1]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
@pytest.mark.parametrize(("kernel", "dilation"), [(3, 1), (3, 2), (4, 1), (1, 1)])
def test_pad_same_equals_manual_pad(
    stride: int, size: tuple[int, int], kernel: int, dilation: int
) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    w = torch.randn(4, 3, kernel, kernel)
    top, bottom = same_padding_amounts(size[0], kernel, stride, dilation)
    left, right = same_padding_amounts(size[1], kernel, stride, dilation)
    manual = F.conv2d(F.pad(x, (left, right, top, bottom)), w, None, stride, 0, dilation)
    padded = pad_same(x, kernel, stride, dilation)
    assert padded.shape[-2:] == (size[0] + top + bottom, size[1] + left + right)
    ours = F.conv2d(padded, w, None, stride, 0, dilation)
    assert torch.equal(ours, manual)
    assert ours.shape[-2:] == (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    if stride == 1:  # PyTorch's own padding="same" also puts the extra pixel after
        assert torch.allclose(ours, F.conv2d(x, w, None, 1, "same", dilation), atol=1e-6)


def test_strided_even_input_pads_after_only() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    padded = pad_same(x, 3, 2)
    assert padded.shape == (1, 1, 5, 5)
    assert torch.equal(padded[..., :4, :4], x)
    assert padded[..., 4, :].abs().sum() == 0 and padded[..., :, 4].abs().sum() == 0


def test_conv2d_same_module() -> None:
    torch.manual_seed(0)
    conv = Conv2dSame(3, 5, 3, stride=2, bias=True)
    assert conv.padding == (0, 0)
    x = torch.randn(2, 3, 10, 11)
    manual = F.conv2d(F.pad(x, (1, 1, 0, 1)), conv.weight, conv.bias, 2)
    assert torch.equal(conv(x), manual)
    assert "same" in repr(conv)


def test_resolve_padding() -> None:
    assert resolve_padding("same", (3, 3), (1, 1), (1, 1)) == ((1, 1), False)
    assert resolve_padding("SAME", (3, 3), (2, 2), (1, 1)) == ((0, 0), True)
    assert resolve_padding("valid", (3, 3), (1, 1), (1, 1)) == ((0, 0), False)
    assert resolve_padding(2, (3, 3), (1, 1), (1, 1)) == ((2, 2), False)
    assert resolve_padding((0, 1), (3, 3), (1, 1), (1, 1)) == ((0, 1), False)


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="padding must be 'same'"):
        resolve_padding("full", (3, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        resolve_padding(-1, (3, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="stride"):
        pad_same(torch.zeros(1, 1, 4, 4), 3, 0)
    with pytest.raises(ValueError, match="kernel_size"):
        pad_same(torch.zeros(1, 1, 4, 4), (3, 3, 3))
    with pytest.raises(ValueError, match=r">= 2 dims"):
        pad_same(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="kernel"):
        same_padding_amounts(8, 0, 1, 1)
    with pytest.raises(ValueError, match="dilation"):
        conv_pair(True, "dilation")
