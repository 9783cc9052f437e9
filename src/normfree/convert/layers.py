"""Small layers that converted networks need and ``normfree.nn`` does not have."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ChannelAffine"]


class ChannelAffine(nn.Module):
    """Learnable per-channel ``y = weight_c·x + bias_c`` on axis 1: the exact eval-mode form of a
    BatchNorm (``weight = γ/√(var+ε)``, ``bias = β − μ·weight``) that cannot be folded into a
    preceding convolution (e.g. the BN → ReLU → conv of pre-activation ResNets, He et al. 2016).
    It uses no batch statistics."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        self.num_channels = num_channels
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.weight.reshape(shape) + self.bias.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_channels}"
