"""Pre-activation baselines with the NF-ResNet topology: BN, WS + GroupNorm and SkipInit ResNets.

Every model here has exactly the layout of :class:`~normfree.models.nf_resnet.NFResNet` (same
stems, stage widths, strides, bottleneck/basic blocks, a strided 1×1 projection shortcut on the
*pre-activated* input at transitions, head ``final → pool → dropout → linear N(0, 0.01)``), so
results can be compared side by side. Only what sits around the convolutions changes:

* ``bn_resnet*`` - ResNetV2 (He et al. 2016, "Identity Mappings in Deep Residual Networks",
  arXiv 1603.05027): ``BN → ReLU → Conv``, He fan-in init, bias-free convs, a final
  ``BN → ReLU`` before the pool; the BN baselines of Brock et al. 2021a (DeepMind
  ``nfnets/resnet.py``, ``ResBlockV2``; deepmind-nfnets.md §6). Batch dependent
  (``meta.uses_batch_stats``). For multi-GPU training convert with
  ``torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)``: it works on these models unchanged.
* ``wsgn_resnet*`` - Weight Standardization + GroupNorm (Qiao et al. 2019, arXiv 1903.10520;
  Wu & He 2018, arXiv 1803.08494): ``GN → ReLU → WSConv`` with
  :class:`~normfree.nn.WSConv2d` (``(W − μ)/(σ_unbiased + 1e-5)``). Batch independent. Groups:
  :func:`group_norm_groups` (32 groups, but at least 2 channels per group: the ImageNet widths
  get 32 everywhere, the small-image widths 16/32/64 get 8/16/32).
  ``use_ws=False`` gives plain GN with He-init convs.
* ``skipinit_resnet*`` - SkipInit (De & Smith 2020, arXiv 2002.10444): no normalization,
  He fan-in convs, ``x + g·f(x)`` with one scalar :class:`~normfree.nn.SkipInitGain` ``g``
  (init ``skipinit_init = 0``) per block. The paper's ImageNet runs needed extra scalar biases
  and dropout: ``use_biases=True`` puts one learnable scalar bias where BN's offset would be
  (before every ReLU, the place of Fixup's ``bias1b``/``bias2b``; the paper does not pin it
  down further) and ``drop_rate`` sets the dropout. The small-image family reaches thousands of
  layers: ``skipinit_resnet_cifar1202`` and ``skipinit_resnet_cifar10004`` (n = 1667 blocks per
  stage, the depth of Fixup's 10,000-layer claim; 161M parameters, builds in ~3 s and runs a
  batch of two 8×8 images in ~1 s on one CPU core).

Block (bottleneck; the basic block drops ``norm3/conv3`` and has two 3×3 convs)::

    out = act(norm1(x))                        # pre-activation
    shortcut = downsample(out) if transition else x
    r = conv1(out)                             # 1×1
    r = conv2(act(norm2(r)))                   # 3×3, stride
    r = conv3(act(norm3(r)))                   # 1×1
    r = branch_probe(r) → drop_path → skip_gain (SkipInit only)
    return r + shortcut
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from normfree.models._layers import HeConv2d
from normfree.models.base import FeatureInfo, ModelMeta, NormFreeModel
from normfree.models.nf_resnet import MaxPoolSame, cifar_depths
from normfree.models.registry import register_model
from normfree.nn.fixup import ScalarBias
from normfree.nn.head import ClassifierHead
from normfree.nn.residual import (
    ResidualBlock,
    SkipInitGain,
    StochasticDepth,
    stochastic_depth_rates,
)
from normfree.nn.ws import WSConv2d

__all__ = [
    "IMAGENET_DEPTHS",
    "PreActResNet",
    "PreActResNetBlock",
    "group_norm_groups",
    "skipinit_resnet_cifar",
]

PAPERS = {
    "batch": "He, Zhang, Ren & Sun 2016, arXiv 1603.05027 (ResNetV2); Ioffe & Szegedy 2015",
    "group": "Qiao et al. 2019, arXiv 1903.10520 (WS); Wu & He 2018, arXiv 1803.08494 (GN)",
    "none": "De & Smith 2020, arXiv 2002.10444",
}
FAMILIES = {"batch": "bn_resnet", "group": "wsgn_resnet", "none": "skipinit_resnet"}
IMAGENET_DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


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


class _Layers:
    """Factory of the layers that change between the baselines (convs, norms, final)."""

    def __init__(
        self, norm: str, use_ws: bool, use_biases: bool, gn_groups: int, gn_min_channels: int
    ) -> None:
        if norm not in FAMILIES:
            raise ValueError(f"norm must be one of {sorted(FAMILIES)}, got {norm!r}")
        self.norm_kind = norm
        self.use_ws = use_ws
        self.use_biases = use_biases
        self.gn_groups = gn_groups
        self.gn_min_channels = gn_min_channels

    def conv(self, in_ch: int, out_ch: int, k: int, stride: int = 1) -> nn.Module:
        if self.norm_kind == "group" and self.use_ws:
            return WSConv2d(in_ch, out_ch, k, stride=stride, padding="same", bias=False)
        return HeConv2d(in_ch, out_ch, k, stride=stride, bias=False)

    def norm(self, channels: int) -> nn.Module:
        if self.norm_kind == "batch":
            return nn.BatchNorm2d(channels)
        if self.norm_kind == "group":
            groups = group_norm_groups(channels, self.gn_groups, self.gn_min_channels)
            return nn.GroupNorm(groups, channels)
        return ScalarBias() if self.use_biases else nn.Identity()


class PreActResNetBlock(ResidualBlock):
    """Pre-activation residual block ``x + f(x)`` (ResNetV2) with BN, GN, or no normalization
    (see the module docstring for the forward pass).

    Args:
        layers: the family's layer factory (internal).
        skipinit: multiply the branch by a scalar SkipInit gain (init ``skipinit_init``).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        layers: _Layers,
        bottleneck: bool = True,
        bottleneck_ratio: float = 0.25,
        drop_path_rate: float = 0.0,
        skipinit: bool = False,
        skipinit_init: float = 0.0,
        stage_index: int = 0,
    ) -> None:
        projection = stride > 1 or in_ch != out_ch
        super().__init__(stage_index=stage_index, is_transition=projection)
        self.act = nn.ReLU()
        self.norm1 = layers.norm(in_ch)
        self.downsample = layers.conv(in_ch, out_ch, 1, stride) if projection else None
        if bottleneck:
            width = int(out_ch * bottleneck_ratio)
            self.conv1 = layers.conv(in_ch, width, 1)
            self.norm2 = layers.norm(width)
            self.conv2 = layers.conv(width, width, 3, stride)
            self.norm3: nn.Module | None = layers.norm(width)
            self.conv3: nn.Module | None = layers.conv(width, out_ch, 1)
        else:
            self.conv1 = layers.conv(in_ch, out_ch, 3, stride)
            self.norm2 = layers.norm(out_ch)
            self.conv2 = layers.conv(out_ch, out_ch, 3)
            self.norm3 = None
            self.conv3 = None
        self.drop_path = StochasticDepth(drop_path_rate)
        self.skip_gain = SkipInitGain(skipinit_init) if skipinit else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        r = self.conv2(self.act(self.norm2(self.conv1(out))))
        if self.conv3 is not None and self.norm3 is not None:
            r = self.conv3(self.act(self.norm3(r)))
        r = self.branch_probe(r)
        r = self.drop_path(r)
        if self.skip_gain is not None:
            r = self.skip_gain(r)
        return r + shortcut


class PreActResNet(NormFreeModel):
    """Pre-activation ResNet with the NF-ResNet topology and a choice of normalization.

    Args:
        depths / channels / strides: blocks, output channels and stride per stage.
        num_classes: classifier size (0: no classifier).
        in_chans: input channels.
        stem: ``"imagenet"`` (7×7/2 conv + 3×3/2 SAME max-pool) or ``"small"`` (3×3/1 conv).
        stem_channels: channels of the stem conv.
        bottleneck: bottleneck (1×1–3×3–1×1, ratio 0.25) or basic (3×3–3×3) blocks.
        norm: ``"batch"`` (BN), ``"group"`` (GN, WS convs unless ``use_ws=False``) or ``"none"``
            (SkipInit: a scalar gain per block).
        use_ws: with ``norm="group"``, Qiao-WS convs (default) or plain He-init convs.
        use_biases: with ``norm="none"``, a scalar bias before every ReLU.
        skipinit_init: initial SkipInit gain (``norm="none"``).
        gn_groups / gn_min_channels_per_group: see :func:`group_norm_groups`.
        stochdepth_rate: block ``i`` of ``N`` drops its branch with ``rate·i/N``.
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        depths: Sequence[int],
        channels: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        stem: str = "imagenet",
        stem_channels: int = 64,
        strides: Sequence[int] = (1, 2, 2, 2),
        bottleneck: bool = True,
        norm: str = "batch",
        use_ws: bool = True,
        use_biases: bool = False,
        skipinit_init: float = 0.0,
        gn_groups: int = 32,
        gn_min_channels_per_group: int = 2,
        stochdepth_rate: float = 0.0,
        drop_rate: float = 0.0,
        meta: ModelMeta | None = None,
    ) -> None:
        super().__init__()
        if not (len(depths) == len(channels) == len(strides)):
            raise ValueError(
                f"depths, channels and strides need one entry per stage, got {len(depths)}, "
                f"{len(channels)} and {len(strides)}"
            )
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        layers = _Layers(norm, use_ws, use_biases, gn_groups, gn_min_channels_per_group)
        self.in_chans = in_chans
        self.stem = nn.Sequential()
        if stem == "imagenet":
            self.stem.add_module("conv", layers.conv(in_chans, stem_channels, 7, 2))
            self.stem.add_module("pool", MaxPoolSame(3, 2))
            reduction = 4
        else:
            self.stem.add_module("conv", layers.conv(in_chans, stem_channels, 3, 1))
            reduction = 1
        self.feature_info = [FeatureInfo("stem", stem_channels, reduction)]

        rates = stochastic_depth_rates(stochdepth_rate, sum(depths))
        in_ch, block_idx = stem_channels, 0
        self.stages = nn.ModuleList()
        for s, (depth, out_ch, stride) in enumerate(zip(depths, channels, strides)):
            blocks = []
            for b in range(depth):
                blocks.append(
                    PreActResNetBlock(
                        in_ch, out_ch, stride if b == 0 else 1, layers, bottleneck=bottleneck,
                        drop_path_rate=rates[block_idx], skipinit=norm == "none",
                        skipinit_init=skipinit_init, stage_index=s,
                    )
                )  # fmt: skip
                in_ch, block_idx = out_ch, block_idx + 1
            reduction *= stride
            self.stages.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"stages.{s}", out_ch, reduction))
        self.final = nn.Sequential()
        self.final.add_module("norm", layers.norm(in_ch))
        self.final.add_module("act", nn.ReLU())
        self.head = ClassifierHead(in_ch, num_classes, drop_rate=drop_rate, init_std=0.01)
        family = FAMILIES[norm]
        meta = meta or ModelMeta(name=family, family=family, paper=PAPERS[norm])
        self.meta = meta.with_updates(
            drop_rate=drop_rate, stochdepth_rate=stochdepth_rate,
            uses_batch_stats=norm == "batch", recipe={"agc": False, **meta.recipe},
        )  # fmt: skip


# ----------------------------------------------------------------------------- registry
def _imagenet(norm: str, depth: int, num_classes: int, overrides: dict[str, Any]) -> PreActResNet:
    family = FAMILIES[norm]
    meta = ModelMeta(
        name=f"{family}{depth}", family=family, train_size=224, test_size=224, paper=PAPERS[norm]
    )
    kwargs: dict[str, Any] = dict(depths=IMAGENET_DEPTHS[depth], channels=(256, 512, 1024, 2048))
    kwargs.update(overrides)
    return PreActResNet(num_classes=num_classes, norm=norm, meta=meta, **kwargs)


def _small(norm: str, depth: int, num_classes: int, overrides: dict[str, Any]) -> PreActResNet:
    width = overrides.pop("width", 1)
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    family = FAMILIES[norm]
    meta = ModelMeta(
        name=f"{family}_cifar{depth}", family=family, train_size=32, test_size=32,
        paper=PAPERS[norm],
    )  # fmt: skip
    kwargs: dict[str, Any] = dict(
        depths=cifar_depths(depth), channels=(16 * width, 32 * width, 64 * width),
        strides=(1, 2, 2), stem="small", stem_channels=16 * width, bottleneck=False,
    )  # fmt: skip
    kwargs.update(overrides)
    return PreActResNet(num_classes=num_classes, norm=norm, meta=meta, **kwargs)


def skipinit_resnet_cifar(depth: int, num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image SkipInit ResNet of any depth ``6n+2`` (the registered names fix the depth;
    ``width`` multiplies the 16/32/64 channels)."""
    return _small("none", depth, num_classes, overrides)


@register_model
def bn_resnet26(num_classes: int = 1000, **overrides: Any) -> PreActResNet:
    """BN-ResNetV2-26 (BN→ReLU→Conv), NF-ResNet-26 topology."""
    return _imagenet("batch", 26, num_classes, overrides)


@register_model
def bn_resnet50(num_classes: int = 1000, **overrides: Any) -> PreActResNet:
    """BN-ResNetV2-50 (He et al. 2016; the BN baseline of Brock et al. 2021a): 25.55M params."""
    return _imagenet("batch", 50, num_classes, overrides)


@register_model
def bn_resnet101(num_classes: int = 1000, **overrides: Any) -> PreActResNet:
    """BN-ResNetV2-101."""
    return _imagenet("batch", 101, num_classes, overrides)


@register_model
def bn_resnet152(num_classes: int = 1000, **overrides: Any) -> PreActResNet:
    """BN-ResNetV2-152."""
    return _imagenet("batch", 152, num_classes, overrides)


@register_model
def bn_resnet_cifar20(num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image BN-ResNetV2-20 (3×3 stem, basic blocks, ``width``·16/32/64 channels)."""
    return _small("batch", 20, num_classes, overrides)


@register_model
def bn_resnet_cifar56(num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image BN-ResNetV2-56."""
    return _small("batch", 56, num_classes, overrides)


@register_model
def bn_resnet_cifar110(num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image BN-ResNetV2-110."""
    return _small("batch", 110, num_classes, overrides)


@register_model
def wsgn_resnet50(num_classes: int = 1000, **overrides: Any) -> PreActResNet:
    """WS + GroupNorm pre-activation ResNet-50 (Qiao et al. 2019), NF-ResNet-50 topology."""
    return _imagenet("group", 50, num_classes, overrides)


@register_model
def wsgn_resnet101(num_classes: int = 1000, **overrides: Any) -> PreActResNet:
    """WS + GroupNorm pre-activation ResNet-101."""
    return _imagenet("group", 101, num_classes, overrides)


@register_model
def wsgn_resnet_cifar20(num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image WS + GN ResNet-20 (GN groups 8/16/32 for 16/32/64 channels)."""
    return _small("group", 20, num_classes, overrides)


@register_model
def wsgn_resnet_cifar56(num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image WS + GN ResNet-56."""
    return _small("group", 56, num_classes, overrides)


@register_model
def wsgn_resnet_cifar110(num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image WS + GN ResNet-110."""
    return _small("group", 110, num_classes, overrides)


@register_model
def skipinit_resnet50(num_classes: int = 1000, **overrides: Any) -> PreActResNet:
    """SkipInit ResNetV2-50 (De & Smith 2020); ``use_biases=True`` and ``drop_rate`` give the
    paper's regularized ImageNet variant."""
    return _imagenet("none", 50, num_classes, overrides)


@register_model
def skipinit_resnet101(num_classes: int = 1000, **overrides: Any) -> PreActResNet:
    """SkipInit ResNetV2-101."""
    return _imagenet("none", 101, num_classes, overrides)


@register_model
def skipinit_resnet_cifar20(num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image SkipInit ResNet-20."""
    return skipinit_resnet_cifar(20, num_classes, **overrides)


@register_model
def skipinit_resnet_cifar56(num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image SkipInit ResNet-56."""
    return skipinit_resnet_cifar(56, num_classes, **overrides)


@register_model
def skipinit_resnet_cifar110(num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image SkipInit ResNet-110."""
    return skipinit_resnet_cifar(110, num_classes, **overrides)


@register_model
def skipinit_resnet_cifar1202(num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image SkipInit ResNet-1202 (200 basic blocks per stage)."""
    return skipinit_resnet_cifar(1202, num_classes, **overrides)


@register_model
def skipinit_resnet_cifar10004(num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image SkipInit ResNet-10004 (1667 basic blocks per stage, 161M parameters)."""
    return skipinit_resnet_cifar(10004, num_classes, **overrides)
