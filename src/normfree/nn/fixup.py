"""Fixup building blocks (Zhang, Dauphin & Ma 2019, "Fixup Initialization: Residual Learning
Without Normalization", arXiv 1901.09321; official code ``hongyi-zhang/Fixup``).

The rule (paper §3, "Fixup"):

1. initialise the classifier and the last layer of every residual branch to 0;
2. initialise every other layer with a standard method (He) and multiply the weight layers
   *inside residual branches* by ``L^(-1/(2m-2))`` (``L`` residual branches, ``m`` layers each);
3. add a scalar multiplier (init 1) per branch and a scalar bias (init 0) before each
   convolution, linear layer and element-wise activation.

The official code draws the branch weights from He *fan-out* normal,
``N(0, 2/(C_out·k²))``, before rescaling, and trains the scalars at ``lr/10``
(:data:`FIXUP_SCALAR_LR_SCALE`; the author's explanation in the repo's issue #6: a scalar's
gradient sums over all channels and there are only O(L) of them).

This module holds the pieces only (no model): :class:`ScalarBias`, :class:`ScalarMultiplier`,
the init functions and :func:`fixup_lr_scale` (the scalars' ``lr/10``; the parameter groups
themselves come from :func:`normfree.optim.build_param_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "FIXUP_SCALAR_LR_SCALE",
    "ScalarBias",
    "ScalarMultiplier",
    "fixup_init_branch_",
    "fixup_lr_scale",
    "fixup_scalar_parameter_names",
    "fixup_scale_factor",
    "he_fan_out_normal_",
    "he_fan_out_std",
]

FIXUP_SCALAR_LR_SCALE = 0.1
"""Learning-rate multiplier of Fixup's scalar biases and multipliers (official training scripts)."""


class ScalarBias(nn.Module):
    """``x + b`` with one learnable scalar ``b`` (parameter ``bias``, shape ``()``, init 0)
    shared by every element (Fixup's ``bias1a``, ``bias1b``, …)."""

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.init = float(init)
        self.bias = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.bias.fill_(self.init)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias

    def extra_repr(self) -> str:
        return f"init={self.init:g}"


class ScalarMultiplier(nn.Module):
    """``x · s`` with one learnable scalar ``s`` (parameter ``scale``, shape ``()``, init 1):
    Fixup's per-branch multiplier ``scale``."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.init = float(init)
        self.scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.scale.fill_(self.init)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"init={self.init:g}"


def fixup_scale_factor(num_branches: int, layers_per_branch: int) -> float:
    """``L^(-1/(2m-2))`` (Fixup rule 2): ``L`` residual branches of ``m`` weight layers.

    >>> round(fixup_scale_factor(16, 3), 6)  # ResNet-50: 16 bottleneck blocks
    0.5
    >>> round(fixup_scale_factor(54, 2), 4)  # small-image ResNet-110: 54 basic blocks
    0.1361
    """
    for name, value in (("num_branches", num_branches), ("layers_per_branch", layers_per_branch)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if num_branches < 1:
        raise ValueError(f"num_branches must be >= 1, got {num_branches}")
    if layers_per_branch < 2:
        raise ValueError(
            f"layers_per_branch must be >= 2 (Fixup scales all but the last layer), "
            f"got {layers_per_branch}"
        )
    return float(num_branches) ** (-1.0 / (2 * layers_per_branch - 2))


def he_fan_out_std(weight: Tensor) -> float:
    """``sqrt(2 / (C_out·∏kernel))``: the He fan-out std of a conv/linear weight
    ``(C_out, C_in, *kernel)``, as the official Fixup code computes it."""
    if weight.dim() < 2:
        raise ValueError(f"weight must have >= 2 dims (out, in, ...), got {list(weight.shape)}")
    fan_out = weight.shape[0] * math.prod(weight.shape[2:])
    return math.sqrt(2.0 / fan_out)


def he_fan_out_normal_(weight: Tensor, factor: float = 1.0) -> Tensor:
    """Fill ``weight`` in place with ``N(0, (factor·he_fan_out_std(weight))²)``."""
    with torch.no_grad():
        return weight.normal_(0.0, he_fan_out_std(weight) * factor)


def fixup_init_branch_(weights: Sequence[Tensor], num_branches: int) -> float:
    """Apply the Fixup rule to one residual branch given its weight layers in forward order:
    every layer but the last gets He fan-out normal × ``L^(-1/(2m-2))`` with ``m = len(weights)``,
    the last is set to 0. Returns the scaling factor."""
    if len(weights) < 2:
        raise ValueError(f"a Fixup branch needs >= 2 weight layers, got {len(weights)}")
    factor = fixup_scale_factor(num_branches, len(weights))
    for w in weights[:-1]:
        he_fan_out_normal_(w, factor)
    with torch.no_grad():
        weights[-1].zero_()
    return factor


def fixup_scalar_parameter_names(module: nn.Module) -> list[str]:
    """Qualified names of the parameters of every :class:`ScalarBias` and
    :class:`ScalarMultiplier` inside ``module`` (Fixup's scalars)."""
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, (ScalarBias, ScalarMultiplier)):
            names.extend(f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters())
    return names


def fixup_lr_scale(module: nn.Module) -> Callable[[str], float]:
    """The official learning-rate rule as ``name -> multiplier``: :data:`FIXUP_SCALAR_LR_SCALE`
    for Fixup's scalars (:func:`fixup_scalar_parameter_names`), 1 otherwise. Pass it to
    :func:`normfree.optim.build_param_groups` as ``lr_scale`` for a module that does not declare
    ``lr_scale`` itself (normfree's Fixup models do)."""
    scalars = frozenset(fixup_scalar_parameter_names(module))

    def lr_scale(name: str) -> float:
        return FIXUP_SCALAR_LR_SCALE if name in scalars else 1.0

    return lr_scale
