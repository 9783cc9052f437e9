"""The eager-CPU tanh-GELU (``normfree.nn.activations.TanhGELU``): the same function as
``nn.GELU(approximate="tanh")`` computed through ``0.5·(1 + tanh(u)) = sigmoid(2u)``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normfree.nn.activations import TanhGELU, get_activation


def reference(x: torch.Tensor) -> torch.Tensor:
    """The official formula (``jax.nn.gelu``, approximate=True) in float64."""
    x = x.double()
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def test_it_is_the_registered_gelu_and_still_an_nn_gelu() -> None:
    act = get_activation("gelu")
    assert isinstance(act, TanhGELU) and isinstance(act, nn.GELU)
    assert act.approximate == "tanh"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_the_float64_formula(dtype: torch.dtype) -> None:
    x = torch.linspace(-12, 12, 20001, dtype=dtype)
    got = TanhGELU()(x).double()
    expected = reference(x)
    # within a few ulps of the output's magnitude (float32: 2^-23 ≈ 1.2e-7)
    ulp = torch.finfo(dtype).eps
    assert ((got - expected).abs() <= 4 * ulp * expected.abs().clamp_min(1.0)).all()
    native = F.gelu(x, approximate="tanh").double()
    assert (got - native).abs().max() <= 4 * ulp * 12


def test_gradient_is_pytorchs_own_and_twice_differentiable() -> None:
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 8, 5, 5, generator=gen)).requires_grad_()
    g = torch.randn(4, 8, 5, 5, generator=gen)
    (ours,) = torch.autograd.grad(TanhGELU()(x), x, g)
    (native,) = torch.autograd.grad(F.gelu(x, approximate="tanh"), x, g)
    assert torch.equal(ours, native)  # the backward is aten's gelu_backward of the same input
    x64 = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(TanhGELU(), (x64,))
    assert torch.autograd.gradgradcheck(TanhGELU(), (x64,))


def test_other_dtypes_and_graph_capture_use_the_native_kernel() -> None:
    x = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    assert torch.equal(TanhGELU()(x), F.gelu(x, approximate="tanh"))
    x32 = torch.randn(2, 3, 4, 4)
    gm = torch.fx.symbolic_trace(nn.Sequential(TanhGELU()))
    assert torch.equal(gm(x32), F.gelu(x32, approximate="tanh"))
    ep = torch.export.export(nn.Sequential(TanhGELU()), (x32,))
    assert torch.equal(ep.module()(x32), F.gelu(x32, approximate="tanh"))
