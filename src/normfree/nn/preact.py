"""The pre-activation residual block (ResNetV2, He, Zhang, Ren & Sun 2016, arXiv 1603.05027,
Fig. 4(e)) that the normalized baselines and SkipInit share; what sits around the convolutions
comes from a layer factory (:class:`normfree.nn.NormLayers` for BN / GN / LN / PN / WS+GN, the
SkipInit file's own factory for no normalization).

Bottleneck block (the basic block drops ``norm3/act3/conv3`` and has two 3×3 convs)::

    out = act1(norm1(x))                       # pre-activation
    shortcut = downsample(out) if transition else x
    r = conv1(out)                             # 1×1
    r = conv2(act2(norm2(r)))                  # 3×3, carries the stride
    r = conv3(act3(norm3(r)))                  # 1×1
    r = branch_probe(r) → drop_path → skip_gain (SkipInit / ReZero only)
    return r + shortcut

With ``fold_scales`` (the default) each group norm without affine carries the affine of the
PN-Act after it in its own kernel (:func:`normfree.nn.proxy_norm.norm_then_act`), which does
not call the two modules; :func:`normfree.nn.plain_forward` switches it off for hooks on them.
"""

# (no ``from __future__ import annotations`` here: TorchScript reads the signature of the unused
# method ``_norm_act`` and cannot resolve its ``int`` from a string annotation)
from typing import Protocol

import torch
from torch import Tensor, nn

from normfree.nn.proxy_norm import norm_then_act
from normfree.nn.residual import ResidualBlock, SkipInitGain, StochasticDepth

__all__ = ["BlockLayers", "PreActBlock"]


class BlockLayers(Protocol):
    """What :class:`PreActBlock` asks of a layer factory."""

    def conv(self, in_ch: int, out_ch: int, k: int, stride: int = 1) -> nn.Module: ...

    def norm(self, channels: int) -> nn.Module: ...

    def act(self, channels: int, top: bool = False) -> nn.Module: ...


class PreActBlock(ResidualBlock):
    """Pre-activation residual block ``x + g·f(x)`` (module docstring).

    Args:
        in_ch / out_ch / stride: channels and stride; a strided 1×1 projection of the
            pre-activated input is the shortcut when the shape changes.
        layers: the conv / norm / activation factory.
        bottleneck: 1×1–3×3–1×1 at width ``out_ch·bottleneck_ratio``, or 3×3–3×3.
        drop_path_rate: stochastic-depth rate of the branch.
        skip_gain: multiply the branch by a scalar gain (SkipInit / ReZero), init ``gain_init``.
        stage_index: index of the stage holding the block.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        layers: BlockLayers,
        bottleneck: bool = True,
        bottleneck_ratio: float = 0.25,
        drop_path_rate: float = 0.0,
        skip_gain: bool = False,
        gain_init: float = 0.0,
        stage_index: int = 0,
    ) -> None:
        projection = stride > 1 or in_ch != out_ch
        super().__init__(stage_index=stage_index, is_transition=projection)
        self.norm1 = layers.norm(in_ch)
        self.act1 = layers.act(in_ch)
        self.downsample = layers.conv(in_ch, out_ch, 1, stride) if projection else None
        self.norm3: nn.Module | None = None
        self.act3: nn.Module | None = None
        self.conv3: nn.Module | None = None
        if bottleneck:
            width = int(out_ch * bottleneck_ratio)
            self.conv1 = layers.conv(in_ch, width, 1)
            self.norm2, self.act2 = layers.norm(width), layers.act(width)
            self.conv2 = layers.conv(width, width, 3, stride)
            self.norm3, self.act3 = layers.norm(width), layers.act(width)
            self.conv3 = layers.conv(width, out_ch, 1)
        else:
            self.conv1 = layers.conv(in_ch, out_ch, 3, stride)
            self.norm2, self.act2 = layers.norm(out_ch), layers.act(out_ch)
            self.conv2 = layers.conv(out_ch, out_ch, 3)
        self.drop_path = StochasticDepth(drop_path_rate)
        self.skip_gain = SkipInitGain(gain_init) if skip_gain else None
        self.fold_scales = True  # PN's affine in the group norm's kernel (module docstring)

    def forward(self, x: Tensor) -> Tensor:
        fold = self.fold_scales and not torch.jit.is_scripting()
        out = self._norm_act(1, x) if fold else self.act1(self.norm1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        r = self.conv1(out)
        r = self.conv2(self._norm_act(2, r) if fold else self.act2(self.norm2(r)))
        if self.conv3 is not None and self.norm3 is not None and self.act3 is not None:
            r = self.conv3(self._norm_act(3, r) if fold else self.act3(self.norm3(r)))
        r = self.branch_probe(r)
        r = self.drop_path(r)
        if self.skip_gain is not None:
            r = self.skip_gain(r)
        return r + shortcut

    def __setstate__(self, state: dict) -> None:  # blocks pickled before the flag
        super().__setstate__(state)
        self.__dict__.setdefault("fold_scales", True)

    @torch.jit.unused
    def _norm_act(self, which: int, x: Tensor) -> Tensor:
        """``act{which}(norm{which}(x))`` through :func:`norm_then_act`."""
        return norm_then_act(getattr(self, f"norm{which}"), getattr(self, f"act{which}"), x)
