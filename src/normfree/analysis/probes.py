"""Small reference networks for the analysis tools ("probes"), following the set-ups of
Labatie 2019 (arXiv 1811.03087, §5–6) and Labatie et al. 2021 (Proxy Normalization,
arXiv 2106.03743, §3, Fig. 2).

* :class:`FeedforwardProbe` - ``depth`` layers ``conv → norm → ReLU`` without skips: 3×3 convs with
  periodic ("circular") boundaries, zero biases, LeCun init for the first conv and He init
  (``std = sqrt(2/(C_in·k²))``) after; the norm is BN (ε = 1e-3), LayerNorm (over C, H, W),
  InstanceNorm, GroupNorm or none, with per-channel affine ``γ ~ N(1, s²)``, ``β ~ N(0, s²)``
  when ``affine_std = s > 0`` (the random nets of the Proxy Normalization power plots use 0.2).
  ``proxy_norm=True`` makes every ``norm → ReLU`` a ``norm (no affine) → PN-Act``
  (:class:`~normfree.nn.ProxyNormActivation`, Labatie et al. 2021, §4) whose affine γ, β take the
  random values instead.
* :class:`ResNetProbe` - a LeCun-init stem conv, then ``units`` pre-activation residual units
  ``x + conv(ReLU(norm(conv(ReLU(norm(x))))))`` with identity skips (Labatie's BN-ResNet).

Both declare ``analysis_points`` (each layer's / unit's output) so the analysis functions find
their points; the pre-activations (norm outputs) of the feedforward probe are ``"layers.*.norm"``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from normfree.nn.proxy_norm import ProxyNormActivation
from normfree.nn.residual import ResidualBlock

__all__ = ["NORM_KINDS", "FeedforwardProbe", "ResNetProbe", "make_norm", "norm_act"]

NORM_KINDS = ("batch", "layer", "instance", "group", "none")


def make_norm(
    kind: str, channels: int, eps: float = 1e-3, groups: int = 4, affine: bool = True
) -> nn.Module:
    """A 2-d normalization layer with per-channel affine (unless ``affine=False``): ``"batch"``
    (BN), ``"layer"`` (LayerNorm over C, H, W = GroupNorm with one group), ``"instance"``,
    ``"group"`` or ``"none"`` (identity)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=eps, affine=affine)
    if kind == "layer":
        return nn.GroupNorm(1, channels, eps=eps, affine=affine)
    if kind == "instance":
        return nn.GroupNorm(channels, channels, eps=eps, affine=affine)
    if kind == "group":
        if channels % groups:
            raise ValueError(f"group norm needs channels ({channels}) divisible by {groups}")
        return nn.GroupNorm(groups, channels, eps=eps, affine=affine)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")


def _conv(in_ch: int, out_ch: int, kernel_size: int, lecun: bool) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2,
                     padding_mode="circular", bias=True)  # fmt: skip
    gain = 1.0 if lecun else 2.0
    with torch.no_grad():
        conv.weight.normal_(0.0, math.sqrt(gain / (in_ch * kernel_size**2)))
        conv.bias.zero_()
    return conv


def _randomise_affine(norm: nn.Module, std: float) -> None:
    if std > 0 and getattr(norm, "weight", None) is not None:
        with torch.no_grad():
            norm.weight.normal_(1.0, std)
            norm.bias.normal_(0.0, std)


def norm_act(
    kind: str, width: int, affine_std: float, proxy_norm: bool
) -> tuple[nn.Module, nn.Module]:
    """``(norm, activation)``: an affine norm and ReLU, or with ``proxy_norm`` a norm without
    affine and a PN-Act (the affine γ, β inside it); the affine is randomised by ``affine_std``."""
    if proxy_norm:
        norm, act = make_norm(kind, width, affine=False), ProxyNormActivation(width)
    else:
        norm, act = make_norm(kind, width), nn.ReLU()
    _randomise_affine(act if proxy_norm else norm, affine_std)
    return norm, act


class FeedforwardProbe(nn.Module):
    """``depth`` layers of ``conv → norm → ReLU`` with no skip connections (see module doc).

    Args:
        depth: number of layers.
        width: channels of every layer.
        in_chans: input channels.
        norm: one of :data:`NORM_KINDS`.
        kernel_size: conv kernel (odd).
        affine_std: std of the random per-channel affine of the norm layers (0: γ=1, β=0).
        proxy_norm: PN-Act instead of ReLU after norms without affine (see module doc).
    """

    def __init__(
        self,
        depth: int,
        width: int = 32,
        in_chans: int = 3,
        norm: str = "batch",
        kernel_size: int = 3,
        affine_std: float = 0.0,
        proxy_norm: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1 or in_chans < 1:
            raise ValueError(f"depth, width and in_chans must be >= 1, got {depth}, {width}, "
                             f"{in_chans}")  # fmt: skip
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        self.in_chans = in_chans
        self.layers = nn.Sequential()
        for i in range(depth):
            layer = nn.Sequential()
            layer.add_module("conv", _conv(in_chans if i == 0 else width, width, kernel_size,
                                           lecun=i == 0))  # fmt: skip
            norm_layer, act = norm_act(norm, width, affine_std, proxy_norm)
            layer.add_module("norm", norm_layer)
            layer.add_module("act", act)
            self.layers.add_module(str(i), layer)
        self.analysis_points = ["layers.*"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ProbeUnit(ResidualBlock):
    """Pre-activation residual unit ``x + conv2(ReLU(norm2(conv1(ReLU(norm1(x))))))``."""

    def __init__(
        self,
        width: int,
        norm: str,
        kernel_size: int,
        stage_index: int = 0,
        affine_std: float = 0.0,
        proxy_norm: bool = False,
    ) -> None:
        super().__init__(stage_index=stage_index, is_transition=False)
        self.norm1, self.act1 = norm_act(norm, width, affine_std, proxy_norm)
        self.conv1 = _conv(width, width, kernel_size, lecun=False)
        self.norm2, self.act2 = norm_act(norm, width, affine_std, proxy_norm)
        self.conv2 = _conv(width, width, kernel_size, lecun=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.conv1(self.act1(self.norm1(x)))
        r = self.conv2(self.act2(self.norm2(r)))
        return x + self.branch_probe(r)


class ResNetProbe(nn.Module):
    """A stem conv and ``units`` pre-activation residual units of constant ``width``
    (Labatie 2019, §6: BN-ResNet with identity skips); ``affine_std`` and ``proxy_norm`` as in
    :class:`FeedforwardProbe`."""

    def __init__(
        self,
        units: int,
        width: int = 32,
        in_chans: int = 3,
        norm: str = "batch",
        kernel_size: int = 3,
        affine_std: float = 0.0,
        proxy_norm: bool = False,
    ) -> None:
        super().__init__()
        if units < 1 or width < 1 or in_chans < 1:
            raise ValueError(f"units, width and in_chans must be >= 1, got {units}, {width}, "
                             f"{in_chans}")  # fmt: skip
        self.in_chans = in_chans
        self.stem = _conv(in_chans, width, kernel_size, lecun=True)
        self.units = nn.Sequential(
            *(ProbeUnit(width, norm, kernel_size, 0, affine_std, proxy_norm) for _ in range(units))
        )
        self.analysis_points = ["units.*"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(self.stem(x))
