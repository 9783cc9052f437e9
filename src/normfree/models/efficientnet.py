"""EfficientNet B0–B5 (Tan & Le 2019, arXiv 1905.11946) in the variants of "Making EfficientNet
More Efficient" (Masters, Labatie, Eaton-Rosen & Luschi 2021, arXiv 2106.03640).

Registered names ``efficientnet_b{0..5}_{g1,g16}_{bn,gn,lnpn}`` (the full grid, 36 models):

* ``g1``: depthwise k×k convs and expand ratio 6 (the original EfficientNet);
  ``g16``: group convs with 16 channels per group and expand ratio 4 (Masters et al. §3). The
  first stage keeps expand ratio 1 and becomes a group conv too (as Graphcore's code does). The
  number of groups is ``C // 16``, lowered to the nearest divisor of ``C`` when 16 does not
  divide it (B3–B5 stems: 40 → 2 groups of 20, 48 → 3 groups of 16).
* ``bn``: BatchNorm (batch dependent); ``gn``: GroupNorm with 4 groups; ``lnpn``: LayerNorm
  over (C, H, W) (= GroupNorm with one group) + Proxy Normalization (Labatie et al. 2021, arXiv
  2106.03743). With PN every norm that is followed by an activation (stem, expand, depthwise)
  has no affine and is followed by PN-Act(swish); the projection norm, which no activation
  follows, keeps its scale but no shift (Graphcore: ``center=False, scale=True``); the head's
  activation subtracts the proxy mean only (``ProxyNormActivation(scale=False)`` of
  :mod:`normfree.models.resnet`); the SE-internal swish is plain. Graphcore folds the
  depthwise PN scale into the SE gate for speed; we apply PN-Act before the SE, which is a
  reparametrisation of the SE's first layer.
  Norm ε = 1e-3 (all variants), PN ε = 0.03; BN momentum 0.01 (TF's 0.99).

Per-model scaling (width, depth, native resolution, dropout; ``round_filters`` to multiples of
8 with the 10 % rule, ``round_repeats = ceil``): B0 1.0/1.0/224/0.2, B1 1.0/1.1/240/0.2,
B2 1.1/1.2/260/0.3, B3 1.2/1.4/300/0.3, B4 1.4/1.8/380/0.4, B5 1.6/2.2/456/0.4. Drop-connect
(stochastic depth) 0.2 with the per-block rate ``0.2·i/N`` over all N blocks and the ``1/keep``
rescaling of the TF code. SE: ``max(1, int(0.25·block input channels))`` hidden units, swish,
sigmoid gate.

Init (Graphcore ``efficientnet.py``): He normal with ``fan_in`` for the group/depthwise convs,
``fan_out`` for the other convs (stem, 1×1s, SE), zero biases; classifier N(0, 0.01) (normfree's
convention; TF uses Glorot uniform). Padding is symmetric ``k//2`` (as torchvision) rather than
TF "SAME".

Resolution (FixRes-style recipe of Masters et al. §5): ``meta.train_size`` is the reduced
training resolution (B0 160, B1 176, B2 196, B3 204, B4 252, B5 328, about half the pixels) and
``meta.test_size`` the native one; ``meta.recipe`` records ``native_size``, ``reduced_size``
and ``finetune_size`` (= native) so that ``normfree train`` can train at the reduced size and
fine-tune briefly at the test size. The paper's training recipe (TensorFlow's RMSprop, 350
epochs, batch 768, weight decay 1e-5, exponential decay, EMA, mixup) is the
``efficientnet_lowres`` recipe of ``normfree train``, not part of the model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from normfree.models.base import FeatureInfo, ModelMeta, NormFreeModel
from normfree.models.registry import register_model
from normfree.nn.activations import check_block_activation, get_activation
from normfree.nn.conv import HeConv2d
from normfree.nn.head import ClassifierHead
from normfree.nn.norm import group_norm_groups, norm_layer
from normfree.nn.proxy_norm import NormAct, ProxyNormActivation, proxy_norm_decay_names
from normfree.nn.residual import (
    ResidualBlock,
    SqueezeExcite,
    StochasticDepth,
    stochastic_depth_rates,
)

__all__ = [
    "EFFICIENTNET_SCALING",
    "EfficientNet",
    "MBConv",
    "ResidualMBConv",
    "conv_groups",
    "round_filters",
    "round_repeats",
]

PAPER = (
    "Tan & Le 2019, arXiv 1905.11946; Masters, Labatie, Eaton-Rosen & Luschi 2021, arXiv 2106.03640"
)
_PN_PAPER = "; Labatie et al. 2021, arXiv 2106.03743 (Proxy Normalization)"

#: name → (width, depth, native resolution, dropout, reduced training resolution)
EFFICIENTNET_SCALING: dict[str, tuple[float, float, int, float, int]] = {
    "b0": (1.0, 1.0, 224, 0.2, 160),
    "b1": (1.0, 1.1, 240, 0.2, 176),
    "b2": (1.1, 1.2, 260, 0.3, 196),
    "b3": (1.2, 1.4, 300, 0.3, 204),
    "b4": (1.4, 1.8, 380, 0.4, 252),
    "b5": (1.6, 2.2, 456, 0.4, 328),
}
#: B0 stages: (expand ratio or None for "the model's ratio", kernel, stride, out channels, repeats)
_B0_STAGES: tuple[tuple[int | None, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (None, 3, 2, 24, 2),
    (None, 5, 2, 40, 2),
    (None, 3, 2, 80, 3),
    (None, 5, 1, 112, 3),
    (None, 5, 2, 192, 4),
    (None, 3, 1, 320, 1),
)
_CONV_VARIANTS = {"g1": (1, 6), "g16": (16, 4)}  # name → (channels per group, expand ratio)
_NORM_VARIANTS = {"bn": ("bn", False), "gn": ("gn", False), "lnpn": ("ln", True)}


def round_filters(filters: float, width: float, divisor: int = 8) -> int:
    """Channels ``filters·width`` rounded to a multiple of ``divisor`` (at least ``divisor``),
    never more than 10 % below the unrounded value (Tan & Le's ``round_filters``)."""
    f = filters * width
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * f else new)


def round_repeats(repeats: int, depth: float) -> int:
    """Blocks per stage after depth scaling: ``ceil(depth·repeats)``."""
    return math.ceil(depth * repeats)


def conv_groups(channels: int, group_size: int) -> int:
    """Groups of a k×k conv with ``group_size`` channels per group: ``channels`` for depthwise
    (``group_size = 1``), else ``max(1, channels // group_size)`` lowered until it divides
    ``channels``."""
    if channels < 1 or group_size < 1:
        raise ValueError(f"channels and group_size must be >= 1, got {channels}, {group_size}")
    g = max(1, channels // group_size)
    while channels % g:
        g -= 1
    return g


class _ScaledNorm(nn.Module):
    """Norm without affine followed by a per-channel scale (no shift): the MBConv projection
    norm of the PN variants (Graphcore: ``center=False, scale=True``)."""

    def __init__(self, norm: nn.Module, channels: int) -> None:
        super().__init__()
        self.norm = norm
        self.weight = nn.Parameter(torch.ones(channels))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x) * self.weight.view(1, -1, 1, 1)


class _Layers:
    """Factory of the norm/activation layers of one EfficientNet variant."""

    def __init__(
        self,
        norm: str,
        proxy_norm: bool,
        activation: str,
        gn_groups: int,
        eps: float,
        pn_eps: float,
    ) -> None:
        if norm not in ("bn", "gn", "ln"):
            raise ValueError(f"norm must be 'bn', 'gn' or 'ln', got {norm!r}")
        get_activation(activation)  # validates the name
        self.norm, self.proxy, self.activation = norm, bool(proxy_norm), activation
        self.gn_groups, self.eps, self.pn_eps = gn_groups, float(eps), float(pn_eps)

    def _groups(self, channels: int) -> int:
        return group_norm_groups(channels, self.gn_groups, 1) if self.norm == "gn" else 1

    def norm_act(self, channels: int, top: bool = False) -> NormAct:
        """``norm → act``; with PN: norm without affine → PN-Act (``top``: centering only)."""
        block = NormAct(
            channels, self.norm, self.proxy, self.activation, num_groups=self._groups(channels),
            eps_norm=self.eps, eps_proxy=self.pn_eps,
        )  # fmt: skip
        if top and self.proxy:
            block.act = ProxyNormActivation(channels, self.activation, self.pn_eps, scale=False)
        return block

    def norm_only(self, channels: int) -> nn.Module:
        """A norm that no activation follows (the MBConv projection)."""
        if not self.proxy:
            return NormAct(
                channels, self.norm, False, None, num_groups=self._groups(channels),
                eps_norm=self.eps,
            )  # fmt: skip
        plain = norm_layer(self.norm, channels, self.eps, False, self._groups(channels))
        return _ScaledNorm(plain, channels)

    def act(self) -> nn.Module:
        return get_activation(self.activation)


class _MBConvLayers:
    """The layers of a mobile inverted bottleneck (shared by :class:`MBConv` and
    :class:`ResidualMBConv`): ``[1×1 expand → norm/act] → k×k group conv (stride) → norm/act →
    SE → 1×1 project → norm``."""

    def _build(
        self: Any,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        se_ratio: float,
        group_size: int,
        layers: _Layers,
    ) -> None:
        mid = in_ch * expand_ratio
        self.expand_conv = None
        self.expand_norm = None
        if expand_ratio != 1:
            self.expand_conv = HeConv2d(in_ch, mid, 1, bias=False, mode="fan_out")
            self.expand_norm = layers.norm_act(mid)
        groups = conv_groups(mid, group_size)
        self.dw_conv = HeConv2d(mid, mid, kernel, stride, groups=groups, bias=False, mode="fan_in")
        self.dw_norm = layers.norm_act(mid)
        hidden = max(1, int(in_ch * se_ratio))
        self.se = (
            SqueezeExcite(mid, hidden, gate_gain=1.0, activation=layers.act())
            if se_ratio > 0
            else None
        )
        self.project_conv = HeConv2d(mid, out_ch, 1, bias=False, mode="fan_out")
        self.project_norm = layers.norm_only(out_ch)

    def _branch(self: Any, x: Tensor) -> Tensor:
        if self.expand_conv is not None:
            x = self.expand_norm(self.expand_conv(x))
        x = self.dw_norm(self.dw_conv(x))
        if self.se is not None:
            x = self.se(x)
        return self.project_norm(self.project_conv(x))


class MBConv(_MBConvLayers, nn.Module):
    """MBConv block without a residual connection (stride > 1 or a change of width)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        se_ratio: float,
        group_size: int,
        layers: _Layers,
    ) -> None:
        nn.Module.__init__(self)
        self._build(in_ch, out_ch, kernel, stride, expand_ratio, se_ratio, group_size, layers)

    def forward(self, x: Tensor) -> Tensor:
        return self._branch(x)


class ResidualMBConv(_MBConvLayers, ResidualBlock):
    """MBConv block with identity residual: ``x + drop_connect(branch_probe(mbconv(x)))``
    (drop-connect rescales kept examples by ``1/keep``, as the TF code)."""

    def __init__(
        self,
        channels: int,
        kernel: int,
        expand_ratio: int,
        se_ratio: float,
        group_size: int,
        layers: _Layers,
        drop_path_rate: float = 0.0,
        stage_index: int = 0,
    ) -> None:
        ResidualBlock.__init__(self, stage_index=stage_index, is_transition=False)
        self._build(channels, channels, kernel, 1, expand_ratio, se_ratio, group_size, layers)
        self.drop_path = StochasticDepth(drop_path_rate, scale_by_keep=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.branch_probe(self._branch(x)))


class EfficientNet(NormFreeModel):
    """EfficientNet with width/depth scaling, group size, expand ratio and norm as options.

    Args:
        width / depth: channel and depth multipliers (see module docstring).
        num_classes / in_chans: classifier size (0: none) and input channels.
        group_size: channels per group of the k×k convs (1: depthwise).
        expand_ratio: MBConv expansion of stages 2–7 (stage 1 keeps 1).
        norm: ``"bn"``, ``"gn"`` or ``"ln"``; ``proxy_norm``: PN-Act after the norms.
        gn_groups: GroupNorm groups (4 in Masters et al.).
        activation: ``"silu"`` (swish) by default.
        se_ratio: SE hidden units per block-input channel (0: no SE).
        stem_channels / head_channels: before width scaling (32 and 1280).
        norm_eps / pn_eps / bn_momentum: 1e-3, 0.03 and 0.01.
        stochdepth_rate / drop_rate: drop-connect (``rate·i/N``) and classifier dropout.
    """

    def __init__(
        self,
        width: float = 1.0,
        depth: float = 1.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        group_size: int = 1,
        expand_ratio: int = 6,
        norm: str = "bn",
        proxy_norm: bool = False,
        gn_groups: int = 4,
        activation: str = "silu",
        se_ratio: float = 0.25,
        stem_channels: int = 32,
        head_channels: int = 1280,
        norm_eps: float = 1e-3,
        pn_eps: float = 0.03,
        bn_momentum: float = 0.01,
        stochdepth_rate: float = 0.2,
        drop_rate: float = 0.2,
        meta: ModelMeta | None = None,
    ) -> None:
        super().__init__()
        check_block_activation(activation)
        if not (width > 0 and depth > 0):
            raise ValueError(f"width and depth multipliers must be > 0, got {width}, {depth}")
        if expand_ratio < 1 or group_size < 1:
            raise ValueError(f"expand_ratio and group_size must be >= 1, got {expand_ratio}, "
                             f"{group_size}")  # fmt: skip
        if not 0.0 <= se_ratio <= 1.0:
            raise ValueError(f"se_ratio must be in [0, 1], got {se_ratio}")
        layers = _Layers(norm, proxy_norm, activation, gn_groups, norm_eps, pn_eps)
        self.in_chans = in_chans
        stem_ch = round_filters(stem_channels, width)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", HeConv2d(in_chans, stem_ch, 3, 2, bias=False, mode="fan_out"))
        self.stem.add_module("norm_act", layers.norm_act(stem_ch))
        self.feature_info = [FeatureInfo("stem", stem_ch, 2)]

        stages = [
            (e or expand_ratio, k, s, round_filters(c, width), round_repeats(r, depth))
            for e, k, s, c, r in _B0_STAGES
        ]
        rates = stochastic_depth_rates(stochdepth_rate, sum(st[4] for st in stages))
        in_ch, block_idx, reduction = stem_ch, 0, 2
        self.stages = nn.ModuleList()
        for si, (e, k, s, out_ch, repeats) in enumerate(stages):
            blocks: list[nn.Module] = []
            for b in range(repeats):
                stride = s if b == 0 else 1
                if stride == 1 and in_ch == out_ch:
                    blocks.append(
                        ResidualMBConv(out_ch, k, e, se_ratio, group_size, layers,
                                       drop_path_rate=rates[block_idx], stage_index=si)
                    )  # fmt: skip
                else:
                    blocks.append(MBConv(in_ch, out_ch, k, stride, e, se_ratio, group_size, layers))
                in_ch, block_idx = out_ch, block_idx + 1
            reduction *= s
            self.stages.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"stages.{si}", out_ch, reduction))
        head_ch = round_filters(head_channels, width)
        self.final = nn.Sequential()
        self.final.add_module("conv", HeConv2d(in_ch, head_ch, 1, bias=False, mode="fan_out"))
        self.final.add_module("norm_act", layers.norm_act(head_ch, top=True))
        self.head = ClassifierHead(head_ch, num_classes, drop_rate=drop_rate, init_std=0.01)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
        meta = meta or ModelMeta(name="efficientnet", family="efficientnet", paper=PAPER)
        self.meta = meta.with_updates(
            drop_rate=drop_rate, stochdepth_rate=stochdepth_rate, uses_batch_stats=norm == "bn",
            recipe={"agc": False, **meta.recipe},
        )  # fmt: skip
        self.init_weights()

    def init_weights(self) -> None:
        """SE 1×1 convs: He normal ``fan_out``, zero bias (the other convs init themselves)."""
        for m in self.modules():
            if isinstance(m, SqueezeExcite):
                for conv in (m.fc1, m.fc2):
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(conv.bias)

    def no_weight_decay_names(self) -> set[str]:
        """Every ``ndim ≤ 1`` tensor except the PN proxy parameters γ̃, β̃ (decayed, Labatie
        et al. 2021)."""
        return super().no_weight_decay_names() - proxy_norm_decay_names(self)


# ----------------------------------------------------------------------------- registry
def _build(
    size: str, conv: str, norm: str, num_classes: int, overrides: dict[str, Any]
) -> EfficientNet:
    width, depth, native, dropout, reduced = EFFICIENTNET_SCALING[size]
    group_size, expand = _CONV_VARIANTS[conv]
    norm_kind, proxy = _NORM_VARIANTS[norm]
    name = f"efficientnet_{size}_{conv}_{norm}"
    meta = ModelMeta(
        name=name, family="efficientnet", train_size=reduced, test_size=native,
        paper=PAPER + (_PN_PAPER if proxy else ""),
        recipe={"native_size": native, "reduced_size": reduced, "finetune_size": native},
    )  # fmt: skip
    kwargs: dict[str, Any] = dict(
        width=width, depth=depth, group_size=group_size, expand_ratio=expand, norm=norm_kind,
        proxy_norm=proxy, drop_rate=dropout, stochdepth_rate=0.2,
    )  # fmt: skip
    kwargs.update(overrides)
    return EfficientNet(num_classes=num_classes, meta=meta, **kwargs)


_CONV_DOC = {"g1": "depthwise convs, expand 6", "g16": "group convs of 16 channels, expand 4"}
_NORM_DOC = {"bn": "BatchNorm", "gn": "GroupNorm (4 groups)", "lnpn": "LayerNorm + Proxy Norm"}


def _register(size: str, conv: str, norm: str) -> None:
    def entry(num_classes: int = 1000, **overrides: Any) -> EfficientNet:
        return _build(size, conv, norm, num_classes, overrides)

    _, _, native, _, reduced = EFFICIENTNET_SCALING[size]
    name = f"efficientnet_{size}_{conv}_{norm}"
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"EfficientNet-{size.upper()} with {_CONV_DOC[conv]} and {_NORM_DOC[norm]} (Masters et "
        f"al. 2021); trains at {reduced} px, tests at {native} px."
    )
    globals()[name] = register_model(entry)


for _size in EFFICIENTNET_SCALING:
    for _conv in _CONV_VARIANTS:
        for _norm in _NORM_VARIANTS:
            _register(_size, _conv, _norm)
