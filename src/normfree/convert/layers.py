"""Small layers that converted networks need and ``normfree.nn`` does not have."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ChannelAffine", "FeatureDropout"]


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


class FeatureDropout(nn.Module):
    """``torch.feature_dropout`` as a module that reads its mode: in ``train()`` it zeroes whole
    channels (axis 1) of an input of any rank with probability ``p`` and scales the rest by
    ``1/(1−p)`` (Tompson et al. 2015); in ``eval()`` it is the identity. ``nn.Dropout1d/2d/3d``
    each accept only their own ranks; conversion uses this module for a source's direct
    ``torch.feature_dropout(x, p, self.training)`` call, whose rank the trace does not record."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p!r}")
        self.p = float(p)
        self.inplace = bool(inplace)

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return torch.feature_dropout_(x, self.p, self.training)
        return torch.feature_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"
