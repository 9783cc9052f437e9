"""Models and steps shared by the tests that hold a device path against the plain form
(``test_cuda.py``, ``test_dispatch.py``)."""

from __future__ import annotations

import torch
from torch import nn

import normfree

__all__ = ["TINY_NFNET", "forward_backward", "make_model"]

# a small NFNet: grouped 3×3 convs, SAME padding, SE, the scaled GELU; compiles in seconds
TINY_NFNET = {"depths": (1, 1, 1, 1), "widths": (32, 64, 96, 128), "group_size": 16}


def make_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """``name`` without stochastic regularisation; every parameter initialised to zero (skip
    gains, biases, a zero-initialised classifier) set to a non-zero value, so that every
    parameter gets a gradient and no comparison is vacuous."""
    torch.manual_seed(0)
    model = normfree.create_model(
        name, num_classes=num_classes, drop_path_rate=0.0, drop_rate=0.0, **kwargs
    )
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("skip_gain.gain"):
                p.fill_(0.3)
            elif not p.any():
                p.normal_(0.0, 0.1)
    return model


def forward_backward(model: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    """``(output, input gradient, {name: gradient})`` of ``model(x)`` pulled back by
    ``upstream``, the parameters without a gradient left out."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(upstream)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads
