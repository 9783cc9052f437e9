"""Layers shared by several model families (NF-ResNets, their "He-init" variants and the
ResNet-layout baselines): :class:`HeConv2d`, :class:`MaxPoolSame`, :func:`resnet_stem`,
:func:`check_resnet_layout` and the two standard layouts, :func:`imagenet_layout` and
:func:`small_image_layout`.

:class:`HeConv2d` is a plain convolution with He-normal init (He et al. 2015, eq. 10 for
``fan_in``, eq. 14 for ``fan_out``), symmetric ``k//2`` padding and an optional bias. It is a
superset of the class of the same name in :mod:`normfree.models.nf_resnet` (same defaults:
``bias=True``, ``mode="fan_in"``), so that module can import it from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normfree.nn.padding import _pad_same_2d

torch.fx.wrap("_pad_same_2d")  # a torch.fx leaf: the amounts depend on the input's size

__all__ = [
    "IMAGENET_DEPTHS",
    "STEM_KINDS",
    "HeConv2d",
    "MaxPoolSame",
    "check_resnet_layout",
    "cifar_depths",
    "imagenet_layout",
    "resnet_stem",
    "small_image_layout",
]

_MODES = ("fan_in", "fan_out")


class HeConv2d(nn.Conv2d):
    """Plain 2-D convolution with He-normal init: ``W ~ N(0, 2/fan)`` with ``fan`` the fan-in
    ``C_in/groups·k²`` (``mode="fan_in"``) or the fan-out ``C_out·k²`` (``mode="fan_out"``,
    torchvision's ResNet and Fixup's rule); zero bias. Padding ``k//2`` (symmetric).

    Args:
        bias: add a learnable per-channel bias (initialised to 0).
        mode: ``"fan_in"`` or ``"fan_out"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        mode: str = "fan_in",
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        self.mode = mode  # read by reset_parameters, which nn.Conv2d.__init__ calls
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
            groups=groups, bias=bias,
        )  # fmt: skip

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode=self.mode, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}"


class MaxPoolSame(nn.Module):
    """3×3 stride-2 max-pool with TF/JAX "SAME" padding (pads with -inf, extra pixel after),
    as the official stem's ``hk.max_pool(padding='SAME')``."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        x = _pad_same_2d(x, (k, k), (s, s), (1, 1), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


STEM_KINDS = ("imagenet", "small")


def check_resnet_layout(
    depths: Sequence[int], channels: Sequence[int], strides: Sequence[int], stem: str
) -> None:
    """The argument checks every ResNet-layout family shares (one entry per stage, a known stem)."""
    if not (len(depths) == len(channels) == len(strides)):
        raise ValueError(
            f"depths, channels and strides need one entry per stage, got {len(depths)}, "
            f"{len(channels)} and {len(strides)}"
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
