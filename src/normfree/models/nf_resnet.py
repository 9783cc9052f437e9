"""NF-ResNets (Brock, De & Smith 2021a, "Characterizing signal propagation to close the
performance gap in unnormalized ResNets", arXiv 2101.08692), following DeepMind's
``nfnets/nf_resnet.py``.

A block computes ``h_{i+1} = shortcut + α · g · f_i(φ(h_i)·γ / β_i)`` (paper §4):

* ``β_i`` is the expected standard deviation of ``h_i`` (tracked by
  :class:`~normfree.nn.ExpectedVariance`, reset after every transition block);
* ``f_i`` is a pre-activation bottleneck (ImageNet) or basic block (small images) of Scaled WS
  convolutions with γ-scaled activations, so that ``Var(f_i) ≈ 1``;
* at a transition the shortcut is a strided 1×1 WS conv of the *normalised* input
  ``φ(h_i)·γ/β_i``, so the variance resets to ``1 + α²``;
* ``g`` is a SkipInit gain initialised to 0 (so at init every block passes its shortcut through);
* stochastic depth drops whole examples' branches with rate ``rate·i/N`` and no rescaling.

Deviations from timm's ``nf_resnet*``: γ lives in the activation (timm folds it into every conv,
which also scales the stem that has no activation in front of it), the shortcut is a strided 1×1
conv without average pooling (as in DeepMind's NF-ResNet), and ``eps`` floors ``N·Var`` (1e-4)
instead of being added to the variance.

``use_ws=False`` replaces every Scaled WS conv by a plain He-initialised conv and the γ-scaled
activation by the plain one: the paper's "NF, He-init" network whose channel means drift with
depth (mean shift, §4.1, Fig. 2). It exists for analysis and comparison.
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
    resnet_stem,
    small_image_layout,
)
from normfree.models.registry import register_model
from normfree.nn.activations import check_block_activation, nf_activation
from normfree.nn.conv import HeConv2d
from normfree.nn.head import ClassifierHead
from normfree.nn.residual import (
    ExpectedVariance,
    NFResidualBlock,
    SqueezeExcite,
    stochastic_depth_rates,
)
from normfree.nn.ws import ScaledStdConv2d

__all__ = ["NFResNet", "NFResNetBlock"]

PAPER = "Brock, De & Smith 2021, arXiv 2101.08692"


def _conv(in_ch: int, out_ch: int, k: int, stride: int, use_ws: bool) -> nn.Module:
    if use_ws:
        return ScaledStdConv2d(in_ch, out_ch, k, stride=stride, padding="same")
    return HeConv2d(in_ch, out_ch, k, stride=stride)


def _act(name: str, use_ws: bool) -> nn.Module:
    # He-init variants use the plain activation (He init already targets ReLU's variance).
    return nf_activation(name, gamma="table" if use_ws else 1.0)


class NFResNetBlock(NFResidualBlock):
    """Normalizer-free pre-activation residual block (Brock et al. 2021a, §4; official
    ``NFResBlock``).

    ``out = act(x)·(1/β)``; shortcut = strided 1×1 conv of ``out`` when the shape changes, else
    ``x``; branch = ``conv1 → act → conv2 → act → conv3`` (bottleneck, ``bottleneck=True``) or
    ``conv1 → act → conv2`` (basic); optional ×2 squeeze-excite; then
    ``branch_probe → stochastic depth → skip gain → ×α``, added to the shortcut.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        beta_multiplier: float,
        alpha: float,
        bottleneck: bool = True,
        bottleneck_ratio: float = 0.25,
        activation: str = "relu",
        use_ws: bool = True,
        use_se: bool = False,
        se_ratio: float = 0.25,
        drop_path_rate: float = 0.0,
        skipinit_init: float = 0.0,
        stage_index: int = 0,
    ) -> None:
        super().__init__(
            in_ch, out_ch, stride, beta_multiplier, alpha, _act(activation, use_ws),
            drop_path_rate=drop_path_rate, skipinit_init=skipinit_init, stage_index=stage_index,
        )  # fmt: skip
        if self.is_transition:
            self.downsample = _conv(in_ch, out_ch, 1, stride, use_ws)
        if bottleneck:
            width = int(out_ch * bottleneck_ratio)
            self.conv1 = _conv(in_ch, width, 1, 1, use_ws)
            self.conv2 = _conv(width, width, 3, stride, use_ws)
            self.conv3 = _conv(width, out_ch, 1, 1, use_ws)
        else:
            self.conv1 = _conv(in_ch, out_ch, 3, stride, use_ws)
            self.conv2 = _conv(out_ch, out_ch, 3, 1, use_ws)
            self.conv3 = None
        self.attn_last = (
            SqueezeExcite(out_ch, max(1, int(out_ch * se_ratio)), gate_gain=2.0) if use_se else None
        )

    def branch(self, out: torch.Tensor) -> torch.Tensor:
        r = self.conv2(self.act(self.conv1(out)))
        if self.conv3 is not None:
            r = self.conv3(self.act(r))
        if self.attn_last is not None:
            r = self.attn_last(r)
        return r

    def branch_folded(self, a: torch.Tensor, in_scale: float) -> torch.Tensor | None:
        """``α·g·branch(a·in_scale)`` with every scale in the conv weights (see
        :class:`~normfree.nn.NFResidualBlock`)."""
        if not self.can_fold(self.conv1, self.conv2, self.conv3, self.downsample):
            return None
        phi, gamma, gain = self.act_fresh, self.act.gamma, self.skip_gain.gain
        r = phi(self.conv1.forward_scaled(a, in_scale))
        last = self.conv2
        if self.conv3 is not None:
            r, last = phi(self.conv2.forward_scaled(r, gamma)), self.conv3
        if self.attn_last is not None:
            return self.attn_last(last.forward_scaled(r, gamma), gain * self.alpha)
        return last.forward_scaled(r, gamma, self.alpha, gain)

    def shortcut_folded(self, a: torch.Tensor, in_scale: float) -> torch.Tensor:
        return self.downsample.forward_scaled(a, in_scale)


class NFResNet(NormFreeModel):
    """Normalizer-free ResNet (Brock et al. 2021a), ImageNet or small-image layout.

    Args:
        depths: blocks per stage.
        channels: output channels per stage.
        num_classes: classifier size (0: no classifier).
        in_chans: input channels.
        stem: ``"imagenet"`` (7×7/2 WS conv + 3×3/2 SAME max-pool, 64 channels) or ``"small"``
            (one 3×3/1 WS conv, for 8×8–32×32 images).
        stem_channels: channels of the stem conv.
        strides: per-stage strides.
        bottleneck: bottleneck (1×1–3×3–1×1, ratio 0.25) or basic (3×3–3×3) blocks.
        alpha: residual scale α (variance grows by α² per block).
        activation: a name known to :func:`normfree.nn.nf_activation` (γ-scaled).
        use_ws: Scaled WS convs (default) or plain He-init convs ("NF, He-init").
        use_se: add ×2 squeeze-excite (ratio ``se_ratio``) after the last conv of each branch.
        stochdepth_rate: network-wide rate; block ``i`` of ``N`` drops with ``rate·i/N``.
        drop_rate: dropout before the classifier.
        skipinit_init: initial value of every SkipInit gain (0: blocks start as identities).
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
        alpha: float = 0.2,
        activation: str = "relu",
        use_ws: bool = True,
        use_se: bool = False,
        se_ratio: float = 0.25,
        stochdepth_rate: float = 0.1,
        drop_rate: float = 0.25,
        skipinit_init: float = 0.0,
        meta: ModelMeta | None = None,
    ) -> None:
        super().__init__()
        check_block_activation(activation)
        check_resnet_layout(depths, channels, strides, stem)
        self.in_chans = in_chans
        self.stem, reduction = resnet_stem(
            stem, in_chans, stem_channels, lambda i, o, k, s: _conv(i, o, k, s, use_ws)
        )
        self.feature_info = [FeatureInfo("stem", stem_channels, reduction)]

        variance = ExpectedVariance(alpha)
        rates = stochastic_depth_rates(stochdepth_rate, sum(depths))
        in_ch, block_idx = stem_channels, 0
        self.stages = nn.ModuleList()
        for s, (depth, out_ch, stride) in enumerate(zip(depths, channels, strides)):
            blocks = []
            for b in range(depth):
                block_stride = stride if b == 0 else 1
                transition = block_stride > 1 or in_ch != out_ch
                blocks.append(
                    NFResNetBlock(
                        in_ch, out_ch, block_stride,
                        beta_multiplier=variance.next_block(first_in_stage=transition),
                        alpha=alpha, bottleneck=bottleneck, activation=activation,
                        use_ws=use_ws, use_se=use_se, se_ratio=se_ratio,
                        drop_path_rate=rates[block_idx], skipinit_init=skipinit_init,
                        stage_index=s,
                    )
                )
                in_ch, block_idx = out_ch, block_idx + 1
            reduction *= stride
            self.stages.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"stages.{s}", out_ch, reduction))
        self.expected_variances = list(variance.history)
        self.final = _act(activation, use_ws)
        self.head = ClassifierHead(in_ch, num_classes, drop_rate=drop_rate, init_std=0.01)
        self.meta = meta or ModelMeta(name="nf_resnet", family="nf_resnet", paper=PAPER)
        self.meta = self.meta.with_updates(drop_rate=drop_rate, stochdepth_rate=stochdepth_rate)


# ----------------------------------------------------------------------------- registry
def _imagenet(depth: int, num_classes: int, **overrides: Any) -> NFResNet:
    name = f"nf_resnet{depth}"
    meta = ModelMeta(name=name, family="nf_resnet", train_size=224, test_size=224, paper=PAPER)
    kwargs = imagenet_layout(depth)
    kwargs.update(overrides)
    return NFResNet(num_classes=num_classes, meta=meta, **kwargs)


@register_model
def nf_resnet26(num_classes: int = 1000, **overrides: Any) -> NFResNet:
    """NF-ResNet-26 (depths 2,2,2,2; not in the official code, as in timm)."""
    return _imagenet(26, num_classes, **overrides)


@register_model
def nf_resnet50(num_classes: int = 1000, **overrides: Any) -> NFResNet:
    """NF-ResNet-50 (Brock et al. 2021a): 25.56M parameters."""
    return _imagenet(50, num_classes, **overrides)


@register_model
def nf_resnet101(num_classes: int = 1000, **overrides: Any) -> NFResNet:
    """NF-ResNet-101 (Brock et al. 2021a)."""
    return _imagenet(101, num_classes, **overrides)


@register_model
def nf_resnet152(num_classes: int = 1000, **overrides: Any) -> NFResNet:
    """NF-ResNet-152 (Brock et al. 2021a)."""
    return _imagenet(152, num_classes, **overrides)


@register_model
def nf_resnet200(num_classes: int = 1000, **overrides: Any) -> NFResNet:
    """NF-ResNet-200 (Brock et al. 2021a)."""
    return _imagenet(200, num_classes, **overrides)


@register_model
def nf_resnet288(num_classes: int = 1000, **overrides: Any) -> NFResNet:
    """NF-ResNet-288 (Brock et al. 2021a)."""
    return _imagenet(288, num_classes, **overrides)


@register_model
def nf_resnet600(num_classes: int = 1000, **overrides: Any) -> NFResNet:
    """NF-ResNet-600 (Brock et al. 2021a; the depth of the paper's SPP figure)."""
    return _imagenet(600, num_classes, **overrides)


def _small(depth: int, num_classes: int, width: Any = 1, **overrides: Any) -> NFResNet:
    name = f"nf_resnet_cifar{depth}"
    meta = ModelMeta(name=name, family="nf_resnet", train_size=32, test_size=32, paper=PAPER)
    kwargs = {**small_image_layout(depth, width), "stochdepth_rate": 0.0, "drop_rate": 0.0}
    kwargs.update(overrides)
    return NFResNet(num_classes=num_classes, meta=meta, **kwargs)


@register_model
def nf_resnet_cifar20(num_classes: int = 10, **overrides: Any) -> NFResNet:
    """Small-image NF-ResNet-20 (3×3 stem, three stages of basic blocks; ``width`` multiplies
    the 16/32/64 channels)."""
    return _small(20, num_classes, **overrides)


@register_model
def nf_resnet_cifar56(num_classes: int = 10, **overrides: Any) -> NFResNet:
    """Small-image NF-ResNet-56."""
    return _small(56, num_classes, **overrides)


@register_model
def nf_resnet_cifar110(num_classes: int = 10, **overrides: Any) -> NFResNet:
    """Small-image NF-ResNet-110."""
    return _small(110, num_classes, **overrides)
