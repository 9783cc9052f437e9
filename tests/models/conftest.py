"""Fixtures shared by the model-family tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn


def _fit_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, steps: int
) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def fit_steps() -> Callable[..., list[float]]:
    """``fit_steps(model, x, y, opt, steps)``: full-batch cross-entropy steps; the losses."""
    return _fit_steps


def _batch_gap(model: nn.Module, x: torch.Tensor) -> float:
    """Largest change of any example's output between the whole batch and the example alone
    (0 for a batch-independent model, up to float error), in the model's current mode."""
    with torch.no_grad():
        batched = model(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])
    assert batched.abs().max() > 1e-3, "outputs are ~0: the comparison would be vacuous"
    return (batched - singles).abs().max().item()


@pytest.fixture
def batch_gap() -> Callable[[nn.Module, torch.Tensor], float]:
    """``batch_gap(model, x)``: see :func:`_batch_gap`."""
    return _batch_gap
