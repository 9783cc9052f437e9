"""``max_pool2d_same``: TF/JAX "SAME" max-pooling through PyTorch's padding + ``ceil_mode``
where that expresses the amounts, equal to pooling an explicitly ``-inf``-padded input."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import normfree.nn.pooling as pooling
from normfree.nn.padding import _pad_same_2d
from normfree.nn.pooling import MaxPoolSame, max_pool2d_same


def reference(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    return F.max_pool2d(_pad_same_2d(x, (k, k), (s, s), (1, 1), value=float("-inf")), k, s)


@pytest.mark.parametrize("k,s", [(1, 1), (2, 2), (3, 1), (3, 2), (3, 3), (5, 2)])
def test_values_and_gradients_equal_the_padded_reference(k: int, s: int) -> None:
    gen = torch.Generator().manual_seed(k * 10 + s)
    for h, w in itertools.product(range(1, 10), range(1, 10)):
        x = torch.randn(2, 3, h, w, dtype=torch.float64, generator=gen, requires_grad=True)
        expected, got = reference(x, k, s), max_pool2d_same(x, k, s)
        assert got.shape == expected.shape == (2, 3, -(-h // s), -(-w // s))
        assert torch.equal(got, expected)
        g = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
        (a,) = torch.autograd.grad(expected, x, g)
        (b,) = torch.autograd.grad(got, x, g)
        assert torch.equal(a, b)


def test_resnet_stem_pool_pads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pad(*args: object, **kwargs: object) -> None:
        raise AssertionError("the ResNet stem pool should not build a padded copy")

    x = torch.randn(2, 4, 64, 64)
    expected = reference(x, 3, 2)
    monkeypatch.setattr(pooling, "_pad_same_2d", no_pad)
    for size in (64, 65, 33):  # even (pad after only) and odd (pad both sides) inputs
        y = torch.randn(2, 4, size, size)
        assert MaxPoolSame()(y).shape[-1] == -(-size // 2)
    assert torch.equal(MaxPoolSame()(x), expected)


def test_traces_as_one_fx_leaf() -> None:
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(MaxPoolSame()))
    x = torch.randn(1, 2, 10, 10)
    assert torch.equal(gm(x), reference(x, 3, 2))
