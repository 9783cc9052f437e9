"""One factory for the normalization schemes of the normalized baselines: a norm spec names the
conv, the norm and the activation that go together.

============  ====================================  ======================  ===================
spec          conv                                  norm (affine?)          activation
============  ====================================  ======================  ===================
``"bn"``      He fan-in, no bias                    BatchNorm2d (affine)    ReLU
``"gn"``      He fan-in, no bias                    GroupNorm (affine)      ReLU
``"ln"``      He fan-in, no bias                    GroupNorm(1) (affine)   ReLU
``"gnpn"``    He fan-in, no bias                    GroupNorm (no affine)   PN-Act(ReLU)
``"lnpn"``    He fan-in, no bias                    GroupNorm(1) (no aff.)  PN-Act(ReLU)
``"wsgn"``    Qiao WS (``(W−μ)/(σ+1e-5)``), no bias  GroupNorm (affine)      ReLU
============  ====================================  ======================  ===================

Sources: BatchNorm (Ioffe & Szegedy 2015, arXiv 1502.03167); GroupNorm (Wu & He 2018, arXiv
1803.08494; :func:`group_norm_groups` picks the group count, 32 by default, §3.1); LayerNorm for
convnets = per-example statistics over (C, H, W), i.e. GroupNorm with one group (Ba et al. 2016,
arXiv 1607.06450; Labatie et al. 2021, §2); Proxy Normalization (Labatie, Masters, Eaton-Rosen &
Luschi 2021, arXiv 2106.03743): the norm loses its affine and every ``norm → ReLU`` becomes
``norm → PN-Act``; the last activation before the pool (``top=True``) only subtracts the proxy
mean; Weight Standardization + GroupNorm (Qiao et al. 2019, arXiv 1903.10520).

Only these six exist: a spec is a string from :data:`NORM_SPECS`, so combinations the papers do
not define (WS with PN, PN without a norm…) cannot be asked for.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from torch import nn

from normfree.nn.conv import HeConv2d
from normfree.nn.ws import WSConv2d

__all__ = [
    "NORM_SPECS",
    "NormLayers",
    "NormSpec",
    "group_norm_groups",
    "norm_layer",
    "norm_layers",
]

NormSpec = Literal["bn", "gn", "ln", "gnpn", "lnpn", "wsgn"]
NORM_SPECS: tuple[str, ...] = get_args(NormSpec)


def group_norm_groups(channels: int, max_groups: int = 32, min_channels_per_group: int = 2) -> int:
    """Number of GroupNorm groups for ``channels``: the largest ``g ≤ max_groups`` that divides
    ``channels`` and leaves at least ``min_channels_per_group`` channels per group (at least 1).

    >>> [group_norm_groups(c) for c in (16, 32, 64, 256)]
    [8, 16, 32, 32]
    """
    if channels < 1 or max_groups < 1 or min_channels_per_group < 1:
        raise ValueError(
            f"channels, max_groups and min_channels_per_group must be >= 1, got {channels}, "
            f"{max_groups} and {min_channels_per_group}"
        )
    g = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % g:
        g -= 1
    return g


def norm_layer(
    kind: str, channels: int, eps: float, affine: bool, num_groups: int = 1
) -> nn.Module:
    """One norm layer: ``"bn"`` BatchNorm2d, ``"gn"`` GroupNorm with ``num_groups`` groups,
    ``"ln"`` GroupNorm with one group (per-example statistics over (C, H, W))."""
    if kind == "bn":
        return nn.BatchNorm2d(channels, eps=eps, affine=affine)
    if kind == "gn":
        return nn.GroupNorm(num_groups, channels, eps=eps, affine=affine)
    if kind == "ln":
        return nn.GroupNorm(1, channels, eps=eps, affine=affine)
    raise ValueError(f"norm kind must be 'bn', 'gn' or 'ln', got {kind!r}")


class NormLayers:
    """The conv, norm and activation layers of one norm spec (see the module docstring).

    Args:
        spec: one of :data:`NORM_SPECS`.
        eps: ε of BN / GN / LN.
        gn_groups / gn_min_channels_per_group: see :func:`group_norm_groups`.
    """

    def __init__(
        self,
        spec: NormSpec,
        eps: float = 1e-5,
        gn_groups: int = 32,
        gn_min_channels_per_group: int = 2,
    ) -> None:
        if spec not in NORM_SPECS:
            raise ValueError(f"norm must be one of {NORM_SPECS}, got {spec!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"norm_eps must be a positive finite number, got {eps!r}")
        self.spec = spec
        self.ws = spec == "wsgn"
        self.proxy = spec.endswith("pn")
        self.kind = spec.removeprefix("ws").removesuffix("pn")  # "bn", "gn" or "ln"
        self.eps = float(eps)
        self.gn_groups = gn_groups
        self.gn_min_channels = gn_min_channels_per_group

    @property
    def uses_batch_stats(self) -> bool:
        """Whether the norm mixes the examples of a batch in training (BatchNorm)."""
        return self.kind == "bn"

    def conv(self, in_ch: int, out_ch: int, k: int, stride: int = 1) -> nn.Module:
        """A bias-free conv: Qiao WS for ``"wsgn"``, He fan-in init otherwise."""
        if self.ws:
            return WSConv2d(in_ch, out_ch, k, stride=stride, padding="same", bias=False)
        return HeConv2d(in_ch, out_ch, k, stride=stride, bias=False)

    def norm(self, channels: int) -> nn.Module:
        """The norm layer; without affine when PN-Act follows (the PN-Act holds γ, β)."""
        groups = 1
        if self.kind == "gn":
            groups = group_norm_groups(channels, self.gn_groups, self.gn_min_channels)
        return norm_layer(self.kind, channels, self.eps, affine=not self.proxy, num_groups=groups)

    def act(self, channels: int, top: bool = False) -> nn.Module:
        """ReLU, or PN-Act for the PN specs (``top``: the final one, mean subtraction only)."""
        if not self.proxy:
            return nn.ReLU()
        from normfree.nn.proxy_norm import ProxyNormActivation  # proxy_norm imports norm_layer

        return ProxyNormActivation(channels, "relu", scale=not top)

    def __repr__(self) -> str:
        return f"NormLayers({self.spec!r}, eps={self.eps:g})"


def norm_layers(
    spec: NormSpec, eps: float = 1e-5, gn_groups: int = 32, gn_min_channels_per_group: int = 2
) -> NormLayers:
    """The :class:`NormLayers` of ``spec`` (``"bn"``, ``"gn"``, ``"ln"``, ``"gnpn"``,
    ``"lnpn"`` or ``"wsgn"``)."""
    return NormLayers(spec, eps, gn_groups, gn_min_channels_per_group)
