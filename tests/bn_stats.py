"""BatchNorm statistics away from their initial values, for conversion tests."""

from __future__ import annotations

import torch
from torch import nn


def warm_bn(model: nn.Module, shape=(8, 3, 16, 16), steps: int = 3) -> nn.Module:
    """Non-trivial running statistics (and γ/β ≠ 1/0): train-mode batches of N(0.5, 2²) in the
    model's dtype; returns the model in eval mode."""
    torch.manual_seed(0)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.train()
        for _ in range(steps):
            model(torch.randn(*shape, dtype=dtype) * 2 + 0.5)
    return model.eval()
