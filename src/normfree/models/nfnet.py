"""NFNets F0–F7 and F0+–F7+ (Brock, De, Smith & Simonyan 2021b, "High-Performance Large-Scale
Image Recognition Without Normalization", arXiv 2102.06171), following DeepMind's
``nfnets/nfnet.py`` and ``base.nfnet_params``, which are the specification.

Architecture (official code; paper §4, Fig. 4):

* **Stem**: four 3×3 Scaled-WS convs, all TF "SAME": 16 (stride 2) → 32 → 64 → ``width[0]//2``
  (stride 2), with a γ-scaled activation between convs and none after the last.
* **Blocks** (:class:`NFNetBlock`): ``out = act(x)·(1/β)``; branch ``conv1`` 1×1 → act →
  ``conv2`` 3×3 grouped (strided at transitions) → act → ``conv2b`` 3×3 grouped → act → ``conv3``
  1×1 → ×2 squeeze-excite (ratio 0.5 of the output channels, unscaled ReLU inside); then the
  branch probe, stochastic depth (``rate·i/N``, no rescaling), a scalar SkipInit gain (init 0) and
  ×α; added to the shortcut. The bottleneck width is ``int(out·0.5)`` rounded *down* to a multiple
  of the group width 128 (so F+ stage 1 uses 128, not 192).
* **Shortcut**: at a strided block a 2×2/2 "SAME" average pool (padding not counted) of ``out``
  followed by a 1×1 WS conv (ResNet-D style); a 1×1 WS conv of ``out`` where only the channel
  count changes; ``x`` otherwise.
* **Expected variance**: ``β`` tracks ``sqrt(Var(h))``; the variance is reset to 1 after each
  stage's first block and grows by α² per block (α = 0.2).
* **Head**: ``final.conv`` 1×1 WS conv to 2× channels → act → mean pool → dropout → linear with
  N(0, 0.01) weights.

The activation is γ·GELU with the **tanh** approximation and the official γ = 1.7015043497085571
(``jax.nn.gelu`` default). Parameter names map 1:1 onto timm's ``dm_nfnet_f*`` ports (``stem.conv1
…conv4``, ``stages.S.B.{conv1, conv2, conv2b, conv3, downsample.conv, attn_last.fc1/fc2}``) except
``skip_gain.gain`` (timm: ``skipinit_gain``) and ``final.conv`` (timm: ``final_conv``); block
``stages.S.B`` is the official ``nf_block_{sum(depths[:S]) + B}``.

Deviations from timm (which follows neither choice of the official code): timm's ``dm_nfnet``
ports use exact (erf) GELU and add ``eps`` to the weight variance, whereas here GELU is the tanh
form and ``eps = 1e-4`` floors ``N·Var(W)`` as in ``base.WSConv2D``. Feature maps for use as a
backbone are the stem output (stride 4) and each stage's output (``feature_info``); timm's
``features_only`` instead reports a stride-2 stem map and the final conv's 3072 channels.

Naming: the official variant ``"Fn+"`` (widths 384, 768, 2048, 2048) is registered as
``nfnet_fn_plus`` because ``+`` cannot appear in a Python identifier.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normfree.models.base import FeatureInfo, ModelMeta, NormFreeModel
from normfree.models.registry import register_model
from normfree.nn.activations import check_block_activation, nf_activation
from normfree.nn.conv import grouped_width
from normfree.nn.head import ClassifierHead
from normfree.nn.pooling import AvgPoolShortcut
from normfree.nn.residual import (
    ExpectedVariance,
    NFResidualBlock,
    SqueezeExcite,
    stochastic_depth_rates,
)
from normfree.nn.ws import ScaledStdConv2d

__all__ = [
    "NFNET_VARIANTS",
    "NFNet",
    "NFNetBlock",
    "NFNetVariant",
]

PAPER = "Brock, De, Smith & Simonyan 2021, arXiv 2102.06171"


class NFNetBlock(NFResidualBlock):
    """NFNet block (official ``nfnet.NFBlock``; Brock et al. 2021b, Fig. 4).

    Forward: ``out = act(x)·beta_multiplier``; shortcut ``downsample(out)`` or ``x``; branch
    ``conv1 → act → conv2 → act → conv2b → act → conv3 → attn_last`` (×2 SE); then
    ``branch_probe → drop_path → skip_gain → ×α`` and ``+ shortcut``.

    Args:
        in_ch / out_ch: block input / output channels.
        stride: stride of ``conv2`` and of the shortcut pool.
        beta_multiplier: ``1/β``, the inverse expected std of the block input.
        alpha: residual scale α.
        expansion: bottleneck ratio of the *output* channels (official ``big_width=True``).
        group_size: channels per group of the 3×3 convs (128).
        se_ratio: SE hidden channels ``max(1, int(out_ch·se_ratio))``.
        activation: γ-scaled activation name (see :func:`normfree.nn.nf_activation`).
        use_two_convs: add ``conv2b`` (the official ``conv1b``).
        drop_path_rate: this block's stochastic-depth rate.
        skipinit_init: initial SkipInit gain (0: the block starts as its shortcut).
        stage_index: index of the stage holding the block.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        beta_multiplier: float,
        alpha: float,
        expansion: float = 0.5,
        group_size: int = 128,
        se_ratio: float = 0.5,
        activation: str = "gelu",
        use_two_convs: bool = True,
        drop_path_rate: float = 0.0,
        skipinit_init: float = 0.0,
        stage_index: int = 0,
    ) -> None:
        super().__init__(
            in_ch, out_ch, stride, beta_multiplier, alpha, nf_activation(activation),
            drop_path_rate=drop_path_rate, skipinit_init=skipinit_init, stage_index=stage_index,
        )  # fmt: skip
        width, groups = grouped_width(out_ch, expansion, group_size)
        self.width, self.groups = width, groups
        if self.is_transition:
            self.downsample = AvgPoolShortcut(in_ch, out_ch, stride)
        self.conv1 = ScaledStdConv2d(in_ch, width, 1)
        self.conv2 = ScaledStdConv2d(width, width, 3, stride=stride, groups=groups)
        self.conv2b = ScaledStdConv2d(width, width, 3, groups=groups) if use_two_convs else None
        self.conv3 = ScaledStdConv2d(width, out_ch, 1)
        self.attn_last = SqueezeExcite(out_ch, max(1, int(out_ch * se_ratio)), gate_gain=2.0)

    def branch(self, out: torch.Tensor) -> torch.Tensor:
        r = self.conv2(self.act(self.conv1(out)))
        if self.conv2b is not None:
            r = self.conv2b(self.act(r))
        return self.attn_last(self.conv3(self.act(r)))

    def branch_folded(self, a: torch.Tensor, in_scale: float) -> torch.Tensor | None:
        """``α·g·branch(a·in_scale)`` with every scale in the conv weights and α·g on the
        squeeze-excite gate (see :class:`~normfree.nn.NFResidualBlock`)."""
        shortcut = None if self.downsample is None else self.downsample.conv
        if not self.can_fold(self.conv1, self.conv2, self.conv2b, self.conv3, shortcut):
            return None
        phi, gamma = self.act_fresh, self.act.gamma
        r = self.conv2.forward_scaled(phi(self.conv1.forward_scaled(a, in_scale)), gamma)
        if self.conv2b is not None:
            r = self.conv2b.forward_scaled(phi(r), gamma)
        r = self.conv3.forward_scaled(phi(r), gamma)
        return self.attn_last(r, self.skip_gain.gain * self.alpha)

    def shortcut_folded(self, a: torch.Tensor, in_scale: float) -> torch.Tensor:
        return self.downsample.conv.forward_scaled(self.downsample.pool(a), in_scale)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha:g}, beta_multiplier={self.beta_multiplier:.6f}, "
            f"width={self.width}, groups={self.groups}"
        )


class NFNet(NormFreeModel):
    """Normalizer-Free Network (Brock et al. 2021b), official ``nfnet.NFNet``.

    Args:
        depths: blocks per stage.
        widths: output channels per stage (before ``width_mult``).
        num_classes: classifier size (0: pooled features out).
        in_chans: input channels.
        width_mult: multiplier of the stage widths (official ``width``; ``int(w·width_mult)``).
        strides: per-stage strides of the first block.
        expansion: bottleneck ratio of the output channels.
        group_size: channels per group of the grouped 3×3 convs.
        se_ratio: squeeze-excite ratio (of the output channels).
        alpha: residual scale α.
        activation: γ-scaled activation (default ``"gelu"``, the tanh approximation).
        stochdepth_rate: network-wide stochastic-depth rate; block ``i`` of ``N`` drops with
            ``rate·i/N``. Default 0.25, the value of the official training config
            (``experiment_nfnets.py``) behind the published results; the official constructor's
            own default is 0.1.
        drop_rate: dropout before the classifier.
        final_conv_mult: the final 1×1 conv has ``int(final_conv_mult·channels)`` outputs.
        use_two_convs: two grouped 3×3 convs per block (``conv2b``).
        skipinit_init: initial value of every SkipInit gain.
        stem_channels: channels of the first three stem convs (the fourth has ``widths[0]//2``).
        meta: the model's :class:`ModelMeta` (``drop_rate``/``stochdepth_rate`` are filled in).
    """

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        strides: Sequence[int] = (1, 2, 2, 2),
        expansion: float = 0.5,
        group_size: int = 128,
        se_ratio: float = 0.5,
        alpha: float = 0.2,
        activation: str = "gelu",
        stochdepth_rate: float = 0.25,
        drop_rate: float = 0.2,
        final_conv_mult: float = 2.0,
        use_two_convs: bool = True,
        skipinit_init: float = 0.0,
        stem_channels: Sequence[int] = (16, 32, 64),
        meta: ModelMeta | None = None,
    ) -> None:
        super().__init__()
        check_block_activation(activation)
        if not (len(depths) == len(widths) == len(strides)) or not depths:
            raise ValueError(
                "depths, widths and strides need one entry per stage (at least one), got "
                f"{len(depths)}, {len(widths)} and {len(strides)}"
            )
        if any(d < 1 for d in depths):
            raise ValueError(f"every stage needs at least one block, got depths {list(depths)}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if len(stem_channels) != 3:
            raise ValueError(f"stem_channels needs 3 entries, got {list(stem_channels)}")
        self.in_chans = in_chans
        ch = widths[0] // 2
        c1, c2, c3 = stem_channels
        self.stem = nn.Sequential(
            OrderedDict(
                conv1=ScaledStdConv2d(in_chans, c1, 3, stride=2),
                act1=nf_activation(activation),
                conv2=ScaledStdConv2d(c1, c2, 3),
                act2=nf_activation(activation),
                conv3=ScaledStdConv2d(c2, c3, 3),
                act3=nf_activation(activation),
                conv4=ScaledStdConv2d(c3, ch, 3, stride=2),
            )
        )
        reduction = 4
        self.feature_info = [FeatureInfo("stem", ch, reduction)]

        variance = ExpectedVariance(alpha)
        rates = stochastic_depth_rates(stochdepth_rate, sum(depths))
        block_idx = 0
        self.stages = nn.ModuleList()
        for s, (depth, width, stride) in enumerate(zip(depths, widths, strides)):
            out_ch = int(width * width_mult)
            blocks = []
            for b in range(depth):
                blocks.append(
                    NFNetBlock(
                        ch, out_ch, stride if b == 0 else 1,
                        # official: the expected std is reset after every stage's first block
                        beta_multiplier=variance.next_block(first_in_stage=b == 0),
                        alpha=alpha, expansion=expansion, group_size=group_size,
                        se_ratio=se_ratio, activation=activation, use_two_convs=use_two_convs,
                        drop_path_rate=rates[block_idx], skipinit_init=skipinit_init,
                        stage_index=s,
                    )
                )  # fmt: skip
                ch, block_idx = out_ch, block_idx + 1
            reduction *= stride
            self.stages.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"stages.{s}", out_ch, reduction))
        self.expected_variances = list(variance.history)

        final_ch = int(final_conv_mult * ch)
        self.final = nn.Sequential(
            OrderedDict(conv=ScaledStdConv2d(ch, final_ch, 1), act=nf_activation(activation))
        )
        self.head = ClassifierHead(final_ch, num_classes, drop_rate=drop_rate, init_std=0.01)
        self.meta = meta or ModelMeta(name="nfnet", family="nfnet", paper=PAPER)
        self.meta = self.meta.with_updates(drop_rate=drop_rate, stochdepth_rate=stochdepth_rate)


# ----------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class NFNetVariant:
    """One row of the official ``base.nfnet_params`` (and of the paper's Table 2)."""

    depths: tuple[int, int, int, int]
    train_size: int
    test_size: int
    drop_rate: float
    randaugment: str  # official "RA_level": layers, then magnitude ("405" = 4 layers, mag. 5)


NFNET_WIDTHS = (256, 512, 1536, 1536)
NFNET_PLUS_WIDTHS = (384, 768, 2048, 2048)

NFNET_VARIANTS: dict[str, NFNetVariant] = {
    "F0": NFNetVariant((1, 2, 6, 3), 192, 256, 0.2, "405"),
    "F1": NFNetVariant((2, 4, 12, 6), 224, 320, 0.3, "410"),
    "F2": NFNetVariant((3, 6, 18, 9), 256, 352, 0.4, "410"),
    "F3": NFNetVariant((4, 8, 24, 12), 320, 416, 0.4, "415"),
    "F4": NFNetVariant((5, 10, 30, 15), 384, 512, 0.5, "415"),
    "F5": NFNetVariant((6, 12, 36, 18), 416, 544, 0.5, "415"),
    "F6": NFNetVariant((7, 14, 42, 21), 448, 576, 0.5, "415"),
    "F7": NFNetVariant((8, 16, 48, 24), 480, 608, 0.5, "415"),
}


def _nfnet(variant: str, plus: bool, num_classes: int, **overrides: Any) -> NFNet:
    v = NFNET_VARIANTS[variant]
    name = f"nfnet_{variant.lower()}" + ("_plus" if plus else "")
    drop_rate = overrides.pop("drop_rate", v.drop_rate)
    meta = ModelMeta(
        name=name, family="nfnet", train_size=v.train_size, test_size=v.test_size,
        recipe={"randaugment": v.randaugment}, paper=PAPER,
    )  # fmt: skip
    kwargs: dict[str, Any] = dict(
        depths=v.depths, widths=NFNET_PLUS_WIDTHS if plus else NFNET_WIDTHS, drop_rate=drop_rate
    )
    kwargs.update(overrides)
    return NFNet(num_classes=num_classes, meta=meta, **kwargs)


@register_model
def nfnet_f0(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F0: 71.5M parameters, 12.38B MACs at 256 px (train 192 px, dropout 0.2)."""
    return _nfnet("F0", False, num_classes, **overrides)


@register_model
def nfnet_f1(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F1: 132.6M parameters, 35.54B MACs at 320 px (train 224 px, dropout 0.3)."""
    return _nfnet("F1", False, num_classes, **overrides)


@register_model
def nfnet_f2(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F2: 193.8M parameters, 62.59B MACs at 352 px (train 256 px, dropout 0.4)."""
    return _nfnet("F2", False, num_classes, **overrides)


@register_model
def nfnet_f3(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F3: 254.9M parameters, 114.76B MACs at 416 px (train 320 px, dropout 0.4)."""
    return _nfnet("F3", False, num_classes, **overrides)


@register_model
def nfnet_f4(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F4: 316.1M parameters, 215.24B MACs at 512 px (train 384 px, dropout 0.5)."""
    return _nfnet("F4", False, num_classes, **overrides)


@register_model
def nfnet_f5(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F5: 377.2M parameters, 289.76B MACs at 544 px (train 416 px, dropout 0.5)."""
    return _nfnet("F5", False, num_classes, **overrides)


@register_model
def nfnet_f6(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F6: 438.4M parameters, 377.28B MACs at 576 px (train 448 px, dropout 0.5)."""
    return _nfnet("F6", False, num_classes, **overrides)


@register_model
def nfnet_f7(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F7: 499.50M parameters, 478.78B MACs at 608 px (train 480 px, dropout 0.5)."""
    return _nfnet("F7", False, num_classes, **overrides)


@register_model
def nfnet_f0_plus(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F0+ (official ``"F0+"``): F0 depths with widths 384, 768, 2048, 2048."""
    return _nfnet("F0", True, num_classes, **overrides)


@register_model
def nfnet_f1_plus(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F1+ (official ``"F1+"``): F1 depths with widths 384, 768, 2048, 2048."""
    return _nfnet("F1", True, num_classes, **overrides)


@register_model
def nfnet_f2_plus(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F2+ (official ``"F2+"``): F2 depths with widths 384, 768, 2048, 2048."""
    return _nfnet("F2", True, num_classes, **overrides)


@register_model
def nfnet_f3_plus(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F3+ (official ``"F3+"``): F3 depths with widths 384, 768, 2048, 2048."""
    return _nfnet("F3", True, num_classes, **overrides)


@register_model
def nfnet_f4_plus(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F4+ (official ``"F4+"``, the paper's JFT-pretrained model): F4 depths with widths
    384, 768, 2048, 2048."""
    return _nfnet("F4", True, num_classes, **overrides)


@register_model
def nfnet_f5_plus(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F5+ (official ``"F5+"``): F5 depths with widths 384, 768, 2048, 2048."""
    return _nfnet("F5", True, num_classes, **overrides)


@register_model
def nfnet_f6_plus(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F6+ (official ``"F6+"``): F6 depths with widths 384, 768, 2048, 2048."""
    return _nfnet("F6", True, num_classes, **overrides)


@register_model
def nfnet_f7_plus(num_classes: int = 1000, **overrides: Any) -> NFNet:
    """NFNet-F7+ (official ``"F7+"``): F7 depths with widths 384, 768, 2048, 2048."""
    return _nfnet("F7", True, num_classes, **overrides)
