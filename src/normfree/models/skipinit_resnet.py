"""SkipInit ResNets (De & Smith 2020, "Batch Normalization Biases Residual Blocks Towards the
Identity Function in Deep Networks", arXiv 2002.10444) and their ReZero aliases, with the
NF-ResNet topology.

No normalization: every ``BN → ReLU`` of the ResNetV2 baseline becomes a plain ReLU, the convs
are He fan-in initialised, and each block computes ``x + g·f(x)`` with one scalar
:class:`~normfree.nn.SkipInitGain` ``g`` initialised to ``skipinit_init = 0``, so every block
starts as the identity (its shortcut). ``use_biases=True`` puts one learnable scalar bias where
BN's offset would be (before every ReLU; the paper's regularized ImageNet variant, with
``drop_rate``). Registered up to ``skipinit_resnet_cifar10004`` (Fixup's 10,000 layers).

ReZero (Bachlechner et al. 2020, arXiv 2003.04887) is ``x + α·F(x)`` with a learnable scalar α
initialised to 0: without normalization it is *identical* to SkipInit (same scalar, same place:
the end of the branch before the addition, same init; a pre-activation block has no activation
after the addition, ReZero's requirement). The registered ``rezero_resnet_cifar*`` are therefore
aliases of ``skipinit_resnet_cifar*`` that differ only in ``meta`` (name, family, paper). (In
ReZero's Transformers one α is shared by all sub-layers of a layer; a ResNet block has one
branch.) ReZero *with* a norm is ``rezero=True`` on :mod:`normfree.models.resnet`.

The block is :class:`normfree.nn.PreActBlock`. Its ``norm1/norm2/norm3`` and ``final.norm`` slots
hold the scalar biases (or nothing), so parameter names line up with the BN baseline's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from torch import nn

from normfree.models.base import ModelMeta
from normfree.models.layouts import (
    PreActResNetBase,
    register_depths,
    variant_layout,
)
from normfree.nn.conv import HeConv2d
from normfree.nn.fixup import ScalarBias

__all__ = ["PAPERS", "SkipInitLayers", "SkipInitResNet", "skipinit_resnet_cifar"]

PAPERS = {
    "skipinit_resnet": "De & Smith 2020, arXiv 2002.10444",
    "rezero_resnet": "Bachlechner et al. 2020, arXiv 2003.04887 (ReZero)",
}


class SkipInitLayers:
    """The layers around SkipInit's convs: He fan-in convs without bias, no norm (a scalar bias
    with ``use_biases``), ReLU."""

    def __init__(self, use_biases: bool = False) -> None:
        self.use_biases = use_biases

    def conv(self, in_ch: int, out_ch: int, k: int, stride: int = 1) -> nn.Module:
        return HeConv2d(in_ch, out_ch, k, stride=stride, bias=False)

    def norm(self, channels: int) -> nn.Module:
        return ScalarBias() if self.use_biases else nn.Identity()

    def act(self, channels: int, top: bool = False) -> nn.Module:
        return nn.ReLU()


class SkipInitResNet(PreActResNetBase):
    """Pre-activation ResNet without normalization, ``x + g·f(x)`` per block (De & Smith 2020).

    Args:
        depths / channels / strides: blocks, output channels and stride per stage.
        num_classes: classifier size (0: no classifier).
        in_chans: input channels.
        stem: ``"imagenet"`` (7×7/2 conv + 3×3/2 SAME max-pool) or ``"small"`` (3×3/1 conv).
        stem_channels: channels of the stem conv.
        bottleneck: bottleneck (1×1–3×3–1×1, ratio 0.25) or basic (3×3–3×3) blocks.
        use_biases: a learnable scalar bias before every ReLU.
        skipinit_init: initial value of every gain ``g`` (0: blocks start as identities).
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
        use_biases: bool = False,
        skipinit_init: float = 0.0,
        stochdepth_rate: float = 0.0,
        drop_rate: float = 0.0,
        meta: ModelMeta | None = None,
    ) -> None:
        super().__init__(
            SkipInitLayers(use_biases), depths, channels, strides, stem, stem_channels,
            in_chans, bottleneck, skip_gain=True, gain_init=skipinit_init,
            num_classes=num_classes, drop_rate=drop_rate, stochdepth_rate=stochdepth_rate,
        )  # fmt: skip
        if meta is None:
            meta = ModelMeta(
                name="skipinit_resnet", family="skipinit_resnet", paper=PAPERS["skipinit_resnet"]
            )
        self.meta = meta.with_updates(
            drop_rate=drop_rate, stochdepth_rate=stochdepth_rate, uses_batch_stats=False,
            recipe={"agc": False, **meta.recipe},
        )  # fmt: skip


# ----------------------------------------------------------------------------- registry
def _build(
    family: str, depth: int, small: bool, num_classes: int, overrides: dict[str, Any]
) -> SkipInitResNet:
    layout, meta = variant_layout(family, depth, small, PAPERS[family], overrides)
    return SkipInitResNet(num_classes=num_classes, meta=meta, **{**layout, **overrides})


def skipinit_resnet_cifar(depth: int, num_classes: int = 10, **overrides: Any) -> SkipInitResNet:
    """Small-image SkipInit ResNet of any depth ``6n+2`` (the registered names fix the depth;
    ``width`` multiplies the 16/32/64 channels)."""
    return _build("skipinit_resnet", depth, True, num_classes, overrides)


_DOCS = {
    "skipinit_resnet": "SkipInit ResNetV2 (De & Smith 2020): no norm, x + g·f(x), g init 0",
    "rezero_resnet": "ReZero ResNet (Bachlechner 2020); identical to skipinit_resnet (alias)",
}
_REGISTERED: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # family: (ImageNet depths, small-image depths)
    "skipinit_resnet": ((50, 101), (20, 56, 110, 1202, 10004)),
    "rezero_resnet": ((), (20, 56, 110)),
}


for _family, (_imagenet_depths, _small_depths) in _REGISTERED.items():
    register_depths(
        _family, _DOCS[_family], _imagenet_depths, _small_depths,
        functools.partial(_build, _family), globals(),
    )  # fmt: skip
