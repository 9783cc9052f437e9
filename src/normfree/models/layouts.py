"""The ResNet layouts that several model families share (NF-ResNets, their "He-init" variants,
the normalized and SkipInit baselines, Fixup and MSR ResNets): :func:`resnet_stem`,
:func:`resnet_stages`, :func:`check_resnet_layout` and the two standard layouts,
:func:`imagenet_layout` (He et al. 2016, arXiv 1512.03385, Table 1) and
:func:`small_image_layout` (§4.2); :class:`PreActResNetBase` is the ResNetV2 body of the
normalized baselines and SkipInit. Layers live in :mod:`normfree.nn`; this module only says how
they are arranged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any

from torch import nn

from normfree.models.base import FeatureInfo, ModelMeta, NormFreeModel
from normfree.models.registry import register_model
from normfree.nn.head import ClassifierHead
from normfree.nn.pooling import MaxPoolSame
from normfree.nn.preact import BlockLayers, PreActBlock
from normfree.nn.residual import stochastic_depth_rates

__all__ = [
    "IMAGENET_DEPTHS",
    "STEM_KINDS",
    "PreActResNetBase",
    "check_resnet_layout",
    "cifar_depths",
    "imagenet_layout",
    "register_depths",
    "resnet_stages",
    "resnet_stem",
    "small_image_layout",
    "variant_layout",
]

STEM_KINDS = ("imagenet", "small")


def check_resnet_layout(
    depths: Sequence[int], channels: Sequence[int], strides: Sequence[int], stem: str
) -> None:
    """The argument checks every ResNet-layout family shares (one entry per stage, at least
    one block in each, a known stem). An empty stage would drop its stride and channel change
    while ``feature_info`` still announced them."""
    if not (len(depths) == len(channels) == len(strides)):
        raise ValueError(
            f"depths, channels and strides need one entry per stage, got {len(depths)}, "
            f"{len(channels)} and {len(strides)}"
        )
    if any(isinstance(d, bool) or not isinstance(d, Integral) or d < 1 for d in depths):
        raise ValueError(
            f"every stage needs at least one block (an int >= 1), got depths {list(depths)}"
        )
    if stem not in STEM_KINDS:
        raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")


def resnet_stem(
    stem: str, in_chans: int, channels: int, conv: Callable[[int, int, int, int], nn.Module]
) -> tuple[nn.Sequential, int]:
    """``(stem, reduction)``: ``"imagenet"`` = 7×7/2 conv + 3×3/2 SAME max-pool (He et al. 2016),
    ``"small"`` = one 3×3/1 conv (for 8×8–32×32 images). ``conv(in, out, kernel, stride)``."""
    module = nn.Sequential()
    if stem == "imagenet":
        module.add_module("conv", conv(in_chans, channels, 7, 2))
        module.add_module("pool", MaxPoolSame(3, 2))
        return module, 4
    module.add_module("conv", conv(in_chans, channels, 3, 1))
    return module, 1


def resnet_stages(
    make_block: Callable[[int, int, int, int, int], nn.Module],
    depths: Sequence[int],
    channels: Sequence[int],
    strides: Sequence[int],
    in_ch: int,
    reduction: int,
) -> tuple[nn.ModuleList, list[FeatureInfo]]:
    """``(stages, feature_info)``: stage ``s`` is an ``nn.Sequential`` of ``depths[s]`` blocks
    ``make_block(in_ch, out_ch, stride, stage_index, block_index)`` (the stride on the first
    block, ``block_index`` counted over the whole network); ``feature_info`` lists each stage's
    output channels and reduction (``reduction`` is the stem's)."""
    stages, info, block_idx = nn.ModuleList(), [], 0
    for s, (depth, out_ch, stride) in enumerate(zip(depths, channels, strides)):
        blocks = []
        for b in range(depth):
            blocks.append(make_block(in_ch, out_ch, stride if b == 0 else 1, s, block_idx))
            in_ch, block_idx = out_ch, block_idx + 1
        reduction *= stride
        stages.append(nn.Sequential(*blocks))
        info.append(FeatureInfo(f"stages.{s}", out_ch, reduction))
    return stages, info


def cifar_depths(depth: int) -> tuple[int, int, int]:
    """Blocks per stage of a small-image basic-block ResNet of ``depth = 6n + 2`` layers
    (He et al. 2016, §4.2)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"small-image ResNet depth must be 6n+2 (e.g. 20, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return (n, n, n)


# blocks per stage of the 4-stage bottleneck ResNets (He et al. 2016, Table 1; 26, 288 and 600
# as in the NF-ResNet paper's figures and timm)
IMAGENET_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    288: (24, 24, 24, 24),
    600: (50, 50, 50, 50),
}


def imagenet_layout(depth: int) -> dict[str, Any]:
    """Constructor arguments of the ImageNet bottleneck ResNet of ``depth`` layers: 7×7 stem,
    output widths 256/512/1024/2048 (the constructors' default stem, strides and blocks)."""
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"no ImageNet ResNet of depth {depth}; known: {sorted(IMAGENET_DEPTHS)}")
    return {"depths": IMAGENET_DEPTHS[depth], "channels": (256, 512, 1024, 2048)}


def small_image_layout(depth: int, width: Any = 1) -> dict[str, Any]:
    """Constructor arguments of the small-image basic-block ResNet of ``depth = 6n + 2`` layers
    (He et al. 2016, §4.2): 3×3 stem, three stages of ``width``·16/32/64 channels, strides 1/2/2."""
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    return {
        "depths": cifar_depths(depth), "channels": (16 * width, 32 * width, 64 * width),
        "strides": (1, 2, 2), "stem": "small", "stem_channels": 16 * width, "bottleneck": False,
    }  # fmt: skip


class PreActResNetBase(NormFreeModel):
    """The pre-activation ResNet body (He et al. 2016, arXiv 1603.05027) with the NF-ResNet
    topology: ``stem → stages of`` :class:`~normfree.nn.PreActBlock` ``→ final (norm, act) →
    head (pool, dropout, linear N(0, 0.01))``. ``layers`` decides what surrounds the convs; a
    family sets ``meta`` after calling this constructor.

    Args:
        layers: conv / norm / activation factory (:class:`~normfree.nn.NormLayers` or SkipInit's).
        depths / channels / strides / stem / stem_channels / in_chans / bottleneck: the layout.
        skip_gain / gain_init: a scalar gain per branch (SkipInit, ReZero) and its initial value.
        num_classes / drop_rate / stochdepth_rate: head size, dropout, stochastic depth.
    """

    def __init__(
        self,
        layers: BlockLayers,
        depths: Sequence[int],
        channels: Sequence[int],
        strides: Sequence[int],
        stem: str,
        stem_channels: int,
        in_chans: int,
        bottleneck: bool,
        skip_gain: bool,
        gain_init: float,
        num_classes: int,
        drop_rate: float,
        stochdepth_rate: float,
    ) -> None:
        super().__init__()
        check_resnet_layout(depths, channels, strides, stem)
        self.in_chans = in_chans
        self.stem, reduction = resnet_stem(stem, in_chans, stem_channels, layers.conv)
        self.feature_info = [FeatureInfo("stem", stem_channels, reduction)]

        rates = stochastic_depth_rates(stochdepth_rate, sum(depths))

        def block(in_ch: int, out_ch: int, stride: int, stage: int, index: int) -> PreActBlock:
            return PreActBlock(
                in_ch, out_ch, stride, layers, bottleneck=bottleneck,
                drop_path_rate=rates[index], skip_gain=skip_gain, gain_init=gain_init,
                stage_index=stage,
            )  # fmt: skip

        self.stages, stage_info = resnet_stages(
            block, depths, channels, strides, stem_channels, reduction
        )
        self.feature_info += stage_info
        width = channels[-1]
        self.final = nn.Sequential()
        self.final.add_module("norm", layers.norm(width))
        self.final.add_module("act", layers.act(width, top=True))
        self.head = ClassifierHead(width, num_classes, drop_rate=drop_rate, init_std=0.01)


def variant_layout(
    family: str, depth: int, small: bool, paper: str, overrides: dict[str, Any]
) -> tuple[dict[str, Any], ModelMeta]:
    """``(layout kwargs, meta)`` of the registered variant ``{family}{depth}`` (ImageNet, 224 px)
    or ``{family}_cifar{depth}`` (small images, 32 px; pops ``width`` from ``overrides``)."""
    if small:
        name, size = f"{family}_cifar{depth}", 32
        layout = small_image_layout(depth, overrides.pop("width", 1))
    else:
        name, size = f"{family}{depth}", 224
        layout = imagenet_layout(depth)
    meta = ModelMeta(name=name, family=family, train_size=size, test_size=size, paper=paper)
    return layout, meta


def register_depths(
    family: str,
    doc: str,
    imagenet_depths: Sequence[int],
    small_depths: Sequence[int],
    build: Callable[..., NormFreeModel],
    namespace: dict[str, Any],
) -> None:
    """Register ``{family}{d}`` for ``imagenet_depths`` and ``{family}_cifar{d}`` for
    ``small_depths``; each entry calls ``build(depth, small, num_classes, overrides)`` and is
    also bound in ``namespace`` (the family module's ``globals()``)."""

    def register(depth: int, small: bool) -> None:
        def entry(num_classes: int = 10 if small else 1000, **overrides: Any) -> NormFreeModel:
            return build(depth, small, num_classes, overrides)

        name = f"{family}_cifar{depth}" if small else f"{family}{depth}"
        kind = (
            "Small-image (3×3 stem, basic blocks, ``width``·16/32/64 channels)"
            if small
            else "ImageNet (bottleneck)"
        )
        entry.__name__ = entry.__qualname__ = name
        entry.__doc__ = f"{kind} {doc}; depth {depth}."
        namespace[name] = register_model(entry)

    for depth in imagenet_depths:
        register(depth, small=False)
    for depth in small_depths:
        register(depth, small=True)
