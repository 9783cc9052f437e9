"""Mean Shift Rejection ResNets (Ruff, Beck & Bach 2019, arXiv 1911.13173).

ResNets without normalization whose training and test graphs are identical apart from injected
noise ("deep data augmentation", §3 (3) of the abstract). The three parts of MSR:

1. **Zero-mean init** (:func:`~normfree.nn.apply_zero_mean_init`): every conv starts with
   zero-mean spatial kernel slices (1×1 convs: zero mean over the input channels of a filter)
   and each filter rescaled to L2 norm ``zmi_magnitude`` ("unity kernel magnitude", default 1;
   ``None`` keeps the He-normal fan-in norm, ≈ √2, after removing the mean). The authors
   draw the kernels uniformly before the mean removal; we start from He-normal: after the
   per-filter rescaling only the shape of the distribution differs.
2. **Keeping the weights on the zero-mean isocline** during training is the optimizer's job:
   ``meta.recipe["msr"] = True`` tells ``normfree.train`` to wrap the optimizer with
   :class:`normfree.optim.MeanShiftRejection`, which constrains exactly the convs initialised
   here (every conv except a 1×1 with one input channel per group).
3. **Noise**: a :class:`~normfree.nn.ChannelNoise` (per-example, per-channel ``U[1−δ, 1+δ]``,
   optional additive ``U[−s, s]``; identity in eval) wherever BN would be in the BN network,
   i.e. after every conv including the stem and the projection shortcuts.

Topology: the post-activation ResNet (He et al. 2015, arXiv 1512.03385) that the authors' code
builds on (``pytorch_resnet_cifar10``, a port of the CIFAR ResNet of the paper), with BN replaced
by ``noise → per-channel bias``::

    conv → noise → bias → ReLU → conv → noise → bias        (basic; bottleneck: 1×1–3×3–1×1)
    out = ReLU(shortcut(x) + skip_gain(drop_path(branch_probe(r))))

* The bias (:class:`ChannelBias`, zero init) takes the place of BN's offset β; the noise is
  applied before it, as BN's minibatch noise acts on the normalized value before the affine.
  ``use_biases=False`` drops them (the authors' ``HasBias`` flag, off by default there).
* Small-image models (``msr_resnet_cifar*``) use the parameter-free "option A" shortcut of the
  CIFAR ResNet: subsample by the stride and append zero channels. ImageNet models
  (``msr_resnet50``) use the torchvision v1.5 bottleneck (stride on the 3×3) and a strided 1×1
  projection ``conv → noise → bias`` (option B, BN replaced like everywhere else).
* Skip gain: the authors' code has no scalar on the residual branch (only an optional
  per-channel scaling of the skip path, off by default), so ``skipinit=False`` by default;
  ``skipinit=True`` adds a :class:`~normfree.nn.SkipInitGain` (init ``skipinit_init``).
* Classifier: pool → dropout → linear N(0, 0.01), not constrained by MSR.

Noise defaults δ = 0.15, s = 0 (the code's ``PerMapRandomScalingLayer`` default δ; its ResNet
default shift is 0). ``noise_delta=0, noise_shift=0`` gives a network whose training output
equals its evaluation output exactly (when stochastic depth and dropout are off).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from normfree.models.base import FeatureInfo, ModelMeta, NormFreeModel
from normfree.models.layouts import (
    check_resnet_layout,
    imagenet_layout,
    small_image_layout,
)
from normfree.models.registry import register_model
from normfree.nn.conv import HeConv2d
from normfree.nn.head import ClassifierHead
from normfree.nn.msr import ChannelNoise, apply_zero_mean_init
from normfree.nn.pooling import MaxPoolSame, ZeroPadShortcut
from normfree.nn.residual import (
    ResidualBlock,
    SkipInitGain,
    StochasticDepth,
    stochastic_depth_rates,
)

__all__ = ["ChannelBias", "MSRResNet", "MSRResNetBlock"]

PAPER = "Ruff, Beck & Bach 2019, arXiv 1911.13173 (Mean Shift Rejection)"


class ChannelBias(nn.Module):
    """``x + b_c``: one learnable bias per channel (parameter ``bias``, shape ``(C,)``, init 0)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.bias = nn.Parameter(torch.zeros(channels))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x + self.bias.view(shape)


class _ConvNoise(nn.Sequential):
    """``conv → noise → bias``: a conv with BN replaced by MSR's training noise and an offset."""

    def __init__(
        self, in_ch: int, out_ch: int, k: int, stride: int, noise: tuple[float, float], bias: bool
    ) -> None:
        super().__init__()
        self.add_module("conv", HeConv2d(in_ch, out_ch, k, stride=stride, bias=False))
        self.add_module("noise", ChannelNoise(*noise))
        self.add_module("bias", ChannelBias(out_ch) if bias else nn.Identity())


class MSRResNetBlock(ResidualBlock):
    """Post-activation residual block of an MSR ResNet (see the module docstring)::

        r = layer2(relu(layer1(x)))                      # basic: two 3×3
        r = layer3(relu(layer2(relu(layer1(x)))))        # bottleneck: 1×1, 3×3 (stride), 1×1
        out = relu(shortcut(x) + skip_gain(drop_path(branch_probe(r))))

    each ``layer`` being ``conv → noise → bias``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        noise: tuple[float, float],
        bottleneck: bool,
        shortcut: str,
        use_biases: bool = True,
        drop_path_rate: float = 0.0,
        skipinit: bool = False,
        skipinit_init: float = 0.0,
        stage_index: int = 0,
    ) -> None:
        projection = stride > 1 or in_ch != out_ch
        super().__init__(stage_index=stage_index, is_transition=projection)
        self.act = nn.ReLU()
        if bottleneck:
            width = out_ch // 4
            self.layer1 = _ConvNoise(in_ch, width, 1, 1, noise, use_biases)
            self.layer2 = _ConvNoise(width, width, 3, stride, noise, use_biases)
            self.layer3: nn.Module | None = _ConvNoise(width, out_ch, 1, 1, noise, use_biases)
        else:
            self.layer1 = _ConvNoise(in_ch, out_ch, 3, stride, noise, use_biases)
            self.layer2 = _ConvNoise(out_ch, out_ch, 3, 1, noise, use_biases)
            self.layer3 = None
        self.shortcut: nn.Module = nn.Identity()
        if projection:
            if shortcut == "zero_pad":
                self.shortcut = ZeroPadShortcut(in_ch, out_ch, stride)
            else:
                self.shortcut = _ConvNoise(in_ch, out_ch, 1, stride, noise, use_biases)
        self.drop_path = StochasticDepth(drop_path_rate)
        self.skip_gain = SkipInitGain(skipinit_init) if skipinit else None

    def forward(self, x: Tensor) -> Tensor:
        r = self.layer2(self.act(self.layer1(x)))
        if self.layer3 is not None:
            r = self.layer3(self.act(r))
        r = self.drop_path(self.branch_probe(r))
        if self.skip_gain is not None:
            r = self.skip_gain(r)
        return self.act(r + self.shortcut(x))


class MSRResNet(NormFreeModel):
    """Mean Shift Rejection ResNet: post-activation, no normalization, zero-mean init, training
    noise where BN would be (module docstring).

    Args:
        depths / channels / strides: blocks, output channels and stride per stage.
        num_classes / in_chans: classifier size (0: none) and input channels.
        stem: ``"imagenet"`` (7×7/2 conv + 3×3/2 SAME max-pool) or ``"small"`` (3×3/1 conv).
        stem_channels: channels of the stem conv.
        bottleneck: bottleneck (expansion 4) or basic blocks.
        shortcut: ``"zero_pad"`` (option A, parameter-free) or ``"conv"`` (1×1 projection).
        noise_delta / noise_shift: δ and s of :class:`~normfree.nn.ChannelNoise`.
        use_biases: a per-channel bias after every noise layer (BN's β).
        zmi_magnitude: L2 norm of every filter after zero-mean init (``None``: He norm).
        skipinit / skipinit_init: a scalar gain on every residual branch.
        stochdepth_rate / drop_rate: stochastic depth (``rate·i/N``) and classifier dropout.
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
        shortcut: str = "conv",
        noise_delta: float = 0.15,
        noise_shift: float = 0.0,
        use_biases: bool = True,
        zmi_magnitude: float | None = 1.0,
        skipinit: bool = False,
        skipinit_init: float = 0.0,
        stochdepth_rate: float = 0.0,
        drop_rate: float = 0.0,
        meta: ModelMeta | None = None,
    ) -> None:
        super().__init__()
        check_resnet_layout(depths, channels, strides, stem)
        if shortcut not in ("zero_pad", "conv"):
            raise ValueError(f"shortcut must be 'zero_pad' or 'conv', got {shortcut!r}")
        if bottleneck and any(c % 4 for c in channels):
            raise ValueError(f"bottleneck channels must be multiples of 4, got {tuple(channels)}")
        noise = (noise_delta, noise_shift)
        ChannelNoise(*noise)  # validate once, with ChannelNoise's messages
        self.zmi_magnitude = zmi_magnitude
        self.in_chans = in_chans
        self.stem = nn.Sequential()
        k, s = (7, 2) if stem == "imagenet" else (3, 1)
        self.stem.add_module("layer", _ConvNoise(in_chans, stem_channels, k, s, noise, use_biases))
        self.stem.add_module("act", nn.ReLU())
        reduction = s
        if stem == "imagenet":
            self.stem.add_module("pool", MaxPoolSame(3, 2))
            reduction *= 2
        self.feature_info = [FeatureInfo("stem", stem_channels, reduction)]

        rates = stochastic_depth_rates(stochdepth_rate, sum(depths))
        in_ch, block_idx = stem_channels, 0
        self.stages = nn.ModuleList()
        for si, (depth, out_ch, stride) in enumerate(zip(depths, channels, strides)):
            blocks = []
            for b in range(depth):
                blocks.append(
                    MSRResNetBlock(
                        in_ch, out_ch, stride if b == 0 else 1, noise, bottleneck, shortcut,
                        use_biases=use_biases, drop_path_rate=rates[block_idx],
                        skipinit=skipinit, skipinit_init=skipinit_init, stage_index=si,
                    )
                )  # fmt: skip
                in_ch, block_idx = out_ch, block_idx + 1
            reduction *= stride
            self.stages.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"stages.{si}", out_ch, reduction))
        self.final = nn.Identity()  # post-activation: the last block ends with a ReLU
        self.head = ClassifierHead(in_ch, num_classes, drop_rate=drop_rate, init_std=0.01)
        meta = meta or ModelMeta(name="msr_resnet", family="msr_resnet", paper=PAPER)
        self.meta = meta.with_updates(
            drop_rate=drop_rate, stochdepth_rate=stochdepth_rate, uses_batch_stats=False,
            recipe={"msr": True, "agc": False, **meta.recipe},
        )  # fmt: skip
        self.init_weights()

    def init_weights(self) -> None:
        """Zero-mean init of every conv (Ruff et al. 2019, §3 (1)) on top of He-normal fan-in
        (skipped for a model built on the ``meta`` device, whose tensors hold no values)."""
        if any(p.is_meta for p in self.parameters()):
            return
        apply_zero_mean_init(self, magnitude=self.zmi_magnitude)


# ----------------------------------------------------------------------------- registry
def _small(depth: int, num_classes: int, overrides: dict[str, Any]) -> MSRResNet:
    name = f"msr_resnet_cifar{depth}"
    meta = ModelMeta(name=name, family="msr_resnet", train_size=32, test_size=32, paper=PAPER)
    kwargs = small_image_layout(depth, overrides.pop("width", 1))
    kwargs["shortcut"] = "zero_pad"
    kwargs.update(overrides)
    return MSRResNet(num_classes=num_classes, meta=meta, **kwargs)


@register_model
def msr_resnet_cifar20(num_classes: int = 10, **overrides: Any) -> MSRResNet:
    """Small-image MSR ResNet-20: post-activation basic blocks, option-A shortcuts, zero-mean
    init, channel noise where BN would be (``width`` multiplies the 16/32/64 channels)."""
    return _small(20, num_classes, overrides)


@register_model
def msr_resnet_cifar56(num_classes: int = 10, **overrides: Any) -> MSRResNet:
    """Small-image MSR ResNet-56."""
    return _small(56, num_classes, overrides)


@register_model
def msr_resnet_cifar110(num_classes: int = 10, **overrides: Any) -> MSRResNet:
    """Small-image MSR ResNet-110."""
    return _small(110, num_classes, overrides)


@register_model
def msr_resnet50(num_classes: int = 1000, **overrides: Any) -> MSRResNet:
    """MSR ResNet-50: torchvision v1.5 bottleneck layout (stride on the 3×3), 1×1 projection
    shortcuts, BN replaced by noise + per-channel bias, zero-mean init."""
    meta = ModelMeta(name="msr_resnet50", family="msr_resnet", paper=PAPER)
    kwargs = imagenet_layout(50)
    kwargs.update(overrides)
    return MSRResNet(num_classes=num_classes, meta=meta, **kwargs)
