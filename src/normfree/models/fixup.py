"""Fixup ResNets (Zhang, Dauphin & Ma 2019, arXiv 1901.09321), following the official code
``hongyi-zhang/Fixup`` (``imagenet/models/fixup_resnet_imagenet.py``,
``cifar/models/fixup_resnet_cifar.py``), in the NF-ResNet topology (same
stems, stage widths, strides, bottleneck/basic blocks and head as
:class:`~normfree.models.nf_resnet.NFResNet`).

Post-activation (v1) blocks with scalar biases before every conv and activation and a scalar
multiplier ``scale`` (init 1); convs have no bias. Bottleneck (``m = 3``)::

    xb = x + bias1a
    r = relu(conv1(xb) + bias1b)
    r = relu(conv2(r + bias2a) + bias2b)          # 3×3, carries the stride
    r = conv3(r + bias3a)                          # branch_probe(r) here
    r = r·scale + bias3b                           # (stochastic depth on this)
    return relu(r + (downsample(xb) if transition else x))

The basic block (``m = 2``) is ``relu(conv1(xb) + bias1b)``, ``conv2(r + bias2a)·scale + bias2b``.

Init (:meth:`FixupBlock.fixup_init_`): the branch convs but the last ~ He fan-out normal
``N(0, 2/(C_out·k²))`` × ``L^(-1/(2m-2))`` with ``L`` the number of blocks (ResNet-50: 0.5,
ResNet-101: 0.417, small-image ResNet-110: 0.136); the last conv of each branch = 0; projection
shortcuts He fan-out normal, not rescaled; classifier weight and bias = 0. So at init every branch
outputs exactly 0 and the logits are exactly 0. Stem ``relu(conv(x) + bias1)`` (+ max-pool on
ImageNet), head ``fc(avgpool(x) + bias2)`` (``final`` holds ``bias2``; adding it before the
mean-pool is the same function).

Faithful to the official code, and where it differs from the paper's rule or our other families:

* The stem conv keeps PyTorch's default ``nn.Conv2d`` init (the official code does not
  re-initialise it), not He.
* Scalars train at ``lr/10`` (``lr_scale``; :func:`normfree.nn.fixup_param_groups`). The official
  scripts select them by ``'bias' in name``, which also puts ``fc.bias`` in the ``lr/10`` group;
  here only the scalars are (``fc.bias`` is a classifier parameter).
* Weight decay applies to *every* parameter, scalars included, as in the official scripts
  (``no_weight_decay_names()`` is empty; ``decay_scalars=False`` restores the library default
  of no decay on tensors with ndim ≤ 1).
* No AGC (``meta.recipe["agc"] = False``): Fixup trains with plain SGD (the official results
  also use mixup: α = 0.7 on ImageNet, 1.0 on CIFAR).
* Small-image shortcuts: ``shortcut="projection"`` (default) uses the strided 1×1 conv of the
  ImageNet models so every family has the same topology; ``shortcut="zero_pad"`` is the official
  CIFAR option A (subsample by the stride, append zero channels, no parameters).
* The ImageNet max-pool is TF "SAME" (:class:`~normfree.nn.MaxPoolSame`) as in
  the NF-ResNet, not ``MaxPool2d(3, 2, padding=1)``: same output size, borders differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from normfree.models.base import FeatureInfo, ModelMeta, NormFreeModel
from normfree.models.layouts import (
    check_resnet_layout,
    imagenet_layout,
    small_image_layout,
)
from normfree.models.registry import register_model
from normfree.nn.conv import HeConv2d
from normfree.nn.fixup import (
    FIXUP_SCALAR_LR_SCALE,
    ScalarBias,
    ScalarMultiplier,
    fixup_init_branch_,
    fixup_scalar_parameter_names,
)
from normfree.nn.head import ClassifierHead
from normfree.nn.pooling import MaxPoolSame, ZeroPadShortcut
from normfree.nn.residual import ResidualBlock, StochasticDepth, stochastic_depth_rates

__all__ = ["FixupBlock", "FixupResNet", "fixup_resnet_cifar"]

PAPER = "Zhang, Dauphin & Ma 2019, arXiv 1901.09321"
_SHORTCUTS = ("projection", "zero_pad")


def _conv(in_ch: int, out_ch: int, k: int, stride: int = 1) -> HeConv2d:
    return HeConv2d(in_ch, out_ch, k, stride=stride, bias=False, mode="fan_out")


class FixupBlock(ResidualBlock):
    """Fixup residual block (basic, ``m = 2``, or bottleneck, ``m = 3``); see the module
    docstring. Attribute names follow the official code (``bias1a`` … ``bias3b``, ``scale``)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        bottleneck: bool = True,
        bottleneck_ratio: float = 0.25,
        shortcut: str = "projection",
        drop_path_rate: float = 0.0,
        stage_index: int = 0,
    ) -> None:
        if shortcut not in _SHORTCUTS:
            raise ValueError(f"shortcut must be one of {_SHORTCUTS}, got {shortcut!r}")
        projection = stride > 1 or in_ch != out_ch
        super().__init__(stage_index=stage_index, is_transition=projection)
        self.act = nn.ReLU()
        self.bias1a = ScalarBias()
        self.bias3a: ScalarBias | None = None
        self.conv3: nn.Module | None = None
        self.bias3b: ScalarBias | None = None
        if bottleneck:
            width = int(out_ch * bottleneck_ratio)
            self.conv1 = _conv(in_ch, width, 1)
            self.bias1b = ScalarBias()
            self.bias2a = ScalarBias()
            self.conv2 = _conv(width, width, 3, stride)
            self.bias2b = ScalarBias()
            self.bias3a = ScalarBias()
            self.conv3 = _conv(width, out_ch, 1)
            self.scale = ScalarMultiplier()
            self.bias3b = ScalarBias()
        else:
            self.conv1 = _conv(in_ch, out_ch, 3, stride)
            self.bias1b = ScalarBias()
            self.bias2a = ScalarBias()
            self.conv2 = _conv(out_ch, out_ch, 3)
            self.scale = ScalarMultiplier()
            self.bias2b = ScalarBias()
        self.downsample: nn.Module | None = None
        if projection:
            if shortcut == "projection":
                self.downsample = _conv(in_ch, out_ch, 1, stride)
            else:
                self.downsample = ZeroPadShortcut(in_ch, out_ch, stride)
        self.drop_path = StochasticDepth(drop_path_rate)

    @property
    def layers_per_branch(self) -> int:
        """``m`` of the Fixup rule: 3 (bottleneck) or 2 (basic)."""
        return 2 if self.conv3 is None else 3

    def branch_weights(self) -> list[torch.Tensor]:
        """The branch's conv weights in forward order (the last one is zero at init)."""
        convs = [self.conv1, self.conv2] + ([self.conv3] if self.conv3 is not None else [])
        return [c.weight for c in convs]

    def fixup_init_(self, num_branches: int) -> float:
        """Fixup init of this block for a network of ``num_branches`` residual branches; returns
        the scaling factor ``L^(-1/(2m-2))``. Projection shortcuts get plain He fan-out."""
        factor = fixup_init_branch_(self.branch_weights(), num_branches)
        if isinstance(self.downsample, HeConv2d):
            self.downsample.reset_parameters()
        return factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = self.bias1a(x)
        r = self.act(self.bias1b(self.conv1(xb)))
        r = self.conv2(self.bias2a(r))
        if self.conv3 is not None and self.bias3a is not None and self.bias3b is not None:
            r = self.conv3(self.bias3a(self.act(self.bias2b(r))))
            r = self.bias3b(self.scale(self.branch_probe(r)))
        else:
            r = self.bias2b(self.scale(self.branch_probe(r)))
        r = self.drop_path(r)
        shortcut = self.downsample(xb) if self.downsample is not None else x
        return self.act(r + shortcut)


class FixupResNet(NormFreeModel):
    """Fixup ResNet (Zhang et al. 2019) with the NF-ResNet topology.

    Args:
        depths / channels / strides: blocks, output channels and stride per stage.
        num_classes: classifier size (0: no classifier).
        in_chans: input channels.
        stem: ``"imagenet"`` (7×7/2 conv + 3×3/2 SAME max-pool) or ``"small"`` (3×3/1 conv).
        stem_channels: channels of the stem conv.
        bottleneck: bottleneck (``m = 3``) or basic (``m = 2``) blocks.
        shortcut: ``"projection"`` (strided 1×1 conv of ``x + bias1a``) or ``"zero_pad"``
            (official CIFAR option A).
        stochdepth_rate: block ``i`` of ``N`` drops its branch with ``rate·i/N`` (not in Fixup).
        drop_rate: dropout before the classifier.
        decay_scalars: weight decay on every parameter as in the official scripts (default), or
            none on tensors with ndim ≤ 1 (``False``).
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
        shortcut: str = "projection",
        stochdepth_rate: float = 0.0,
        drop_rate: float = 0.0,
        decay_scalars: bool = True,
        meta: ModelMeta | None = None,
    ) -> None:
        super().__init__()
        check_resnet_layout(depths, channels, strides, stem)
        if sum(depths) < 1:
            raise ValueError(f"a Fixup ResNet needs at least one block, got depths {depths}")
        self.in_chans = in_chans
        self.decay_scalars = bool(decay_scalars)
        self.stem = nn.Sequential()
        if stem == "imagenet":
            self.stem.add_module("conv", nn.Conv2d(in_chans, stem_channels, 7, 2, 3, bias=False))
        else:
            self.stem.add_module("conv", nn.Conv2d(in_chans, stem_channels, 3, 1, 1, bias=False))
        self.stem.add_module("bias", ScalarBias())
        self.stem.add_module("act", nn.ReLU())
        reduction = 1
        if stem == "imagenet":
            self.stem.add_module("pool", MaxPoolSame(3, 2))
            reduction = 4
        self.feature_info = [FeatureInfo("stem", stem_channels, reduction)]

        self.num_branches = sum(depths)
        rates = stochastic_depth_rates(stochdepth_rate, self.num_branches)
        in_ch, block_idx = stem_channels, 0
        self.stages = nn.ModuleList()
        for s, (depth, out_ch, stride) in enumerate(zip(depths, channels, strides)):
            blocks = []
            for b in range(depth):
                blocks.append(
                    FixupBlock(
                        in_ch, out_ch, stride if b == 0 else 1, bottleneck=bottleneck,
                        shortcut=shortcut, drop_path_rate=rates[block_idx], stage_index=s,
                    )
                )  # fmt: skip
                in_ch, block_idx = out_ch, block_idx + 1
            reduction *= stride
            self.stages.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"stages.{s}", out_ch, reduction))
        self.final = ScalarBias()  # Fixup's bias2: fc(avgpool(x) + bias2) == fc(avgpool(x + bias2))
        self.head = ClassifierHead(in_ch, num_classes, drop_rate=drop_rate, init_std=0.0)
        meta = meta or ModelMeta(name="fixup_resnet", family="fixup_resnet", paper=PAPER)
        self.meta = meta.with_updates(
            drop_rate=drop_rate, stochdepth_rate=stochdepth_rate,
            recipe={"scalar_lr_scale": FIXUP_SCALAR_LR_SCALE, "agc": False, **meta.recipe},
        )  # fmt: skip
        self._scalar_names = frozenset(fixup_scalar_parameter_names(self))
        self.init_weights()

    def init_weights(self) -> None:
        """Fixup init of every block (rule 1–2) and a zero classifier."""
        for stage in self.stages:  # (not named_modules: fast for 10,000-layer models)
            for block in stage:
                block.fixup_init_(self.num_branches)
        self.head.reset_parameters()

    def fixup_scale_factor(self) -> float:
        """``L^(-1/(2m-2))`` of this network (``L`` = number of blocks)."""
        block = next(b for _, b in self.residual_blocks())
        return self.num_branches ** (-1.0 / (2 * block.layers_per_branch - 2))

    def lr_scale(self, name: str) -> float:
        """0.1 for Fixup's scalar biases and multipliers (official ``lr/10``), else 1."""
        return FIXUP_SCALAR_LR_SCALE if name in self._scalar_names else 1.0

    def no_weight_decay_names(self) -> set[str]:
        """Empty (the official scripts decay every parameter) unless ``decay_scalars=False``."""
        return set() if self.decay_scalars else super().no_weight_decay_names()


# ----------------------------------------------------------------------------- registry
def _imagenet(depth: int, num_classes: int, overrides: dict[str, Any]) -> FixupResNet:
    meta = ModelMeta(
        name=f"fixup_resnet{depth}", family="fixup_resnet", train_size=224, test_size=224,
        paper=PAPER,
    )  # fmt: skip
    kwargs = imagenet_layout(depth)
    kwargs.update(overrides)
    return FixupResNet(num_classes=num_classes, meta=meta, **kwargs)


def fixup_resnet_cifar(depth: int, num_classes: int = 10, **overrides: Any) -> FixupResNet:
    """Small-image Fixup ResNet of any depth ``6n+2`` (3×3 stem, basic blocks, ``width``·16/32/64
    channels); the registered ``fixup_resnet_cifar*`` names fix the depth."""
    meta = ModelMeta(
        name=f"fixup_resnet_cifar{depth}", family="fixup_resnet", train_size=32, test_size=32,
        paper=PAPER,
    )  # fmt: skip
    kwargs = small_image_layout(depth, overrides.pop("width", 1))
    kwargs.update(overrides)
    return FixupResNet(num_classes=num_classes, meta=meta, **kwargs)


@register_model
def fixup_resnet50(num_classes: int = 1000, **overrides: Any) -> FixupResNet:
    """Fixup ResNet-50 (L = 16 blocks, scale factor 16^-1/4 = 0.5)."""
    return _imagenet(50, num_classes, overrides)


@register_model
def fixup_resnet101(num_classes: int = 1000, **overrides: Any) -> FixupResNet:
    """Fixup ResNet-101 (L = 33, factor 33^-1/4 ≈ 0.417)."""
    return _imagenet(101, num_classes, overrides)


@register_model
def fixup_resnet152(num_classes: int = 1000, **overrides: Any) -> FixupResNet:
    """Fixup ResNet-152 (L = 50)."""
    return _imagenet(152, num_classes, overrides)


@register_model
def fixup_resnet_cifar20(num_classes: int = 10, **overrides: Any) -> FixupResNet:
    """Small-image Fixup ResNet-20 (L = 9, factor 9^-1/2)."""
    return fixup_resnet_cifar(20, num_classes, **overrides)


@register_model
def fixup_resnet_cifar56(num_classes: int = 10, **overrides: Any) -> FixupResNet:
    """Small-image Fixup ResNet-56 (L = 27)."""
    return fixup_resnet_cifar(56, num_classes, **overrides)


@register_model
def fixup_resnet_cifar110(num_classes: int = 10, **overrides: Any) -> FixupResNet:
    """Small-image Fixup ResNet-110 (L = 54, factor 54^-1/2 ≈ 0.136)."""
    return fixup_resnet_cifar(110, num_classes, **overrides)


@register_model
def fixup_resnet_cifar1202(num_classes: int = 10, **overrides: Any) -> FixupResNet:
    """Small-image Fixup ResNet-1202 (L = 600)."""
    return fixup_resnet_cifar(1202, num_classes, **overrides)


@register_model
def fixup_resnet_cifar10004(num_classes: int = 10, **overrides: Any) -> FixupResNet:
    """Small-image Fixup ResNet-10004 (L = 5001 blocks, 10,004 layers: the paper's
    "10,000 layers"; 161M parameters, builds in a few seconds on a CPU)."""
    return fixup_resnet_cifar(10004, num_classes, **overrides)
