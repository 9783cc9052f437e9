"""Fixtures of the nn tests: the optional native CPU kernels (normfree.nn.native)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from normfree.nn import native


@pytest.fixture(scope="session")
def kernels():
    """The native kernels built (once per machine, ~30 s) and switched on for one test at a
    time through :func:`native_on`; skips where no C++ compiler/OpenMP can build them."""
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


def _assert_step_matches_the_op_path(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """A float64 training step of ``model`` gives the same loss (1e-12) and every parameter's
    gradient (1e-9) with the native kernels as with the PyTorch-op path."""
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


@pytest.fixture
def assert_step_matches_the_op_path(
    kernels,
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], None]:
    """:func:`_assert_step_matches_the_op_path`, with the kernels built."""
    return _assert_step_matches_the_op_path
