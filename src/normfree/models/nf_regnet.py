"""NF-RegNets B0–B8 (Brock, De & Smith 2021a, "Characterizing signal propagation to close the
performance gap in unnormalized ResNets", arXiv 2101.08692, §5 and App. E), following DeepMind's
``nfnets/nf_regnet.py`` and ``base.nf_regnet_params``, which are the specification.

Architecture (official code):

* **Stem**: one 3×3 stride-2 "SAME" Scaled-WS conv to ``int(0.75·widths[0])`` channels, no
  activation after it.
* **Stages**: the first block of *every* stage (the first stage too) has stride 2; the output
  width of a stage is ``int(0.75·width)``.
* **Block** (:class:`NFRegNetBlock`): ``out = act(x)·(1/β)``; expanded width
  ``8·(int(in_ch·e)//8)`` with ``e = 2.25`` (``e = 1`` for the network's very first block,
  "following EfficientNet"), computed from the block's *input* channels; branch ``conv1`` 1×1 →
  act → ``conv2`` 3×3 grouped (group size 8, strided at transitions) → ×2 squeeze-excite on the
  expanded width (hidden ``int(0.5·width)``, unscaled ReLU) → act → ``conv3`` 1×1; then the branch
  probe, stochastic depth (``rate·i/N``, no rescaling), a scalar SkipInit gain (init 0) and ×α,
  added to the shortcut. Shortcut: 2×2/2 "SAME" average pool + 1×1 WS conv at strided blocks, a
  1×1 WS conv where only the channels change, ``x`` otherwise.
* **Head**: ``final.conv`` 1×1 WS conv to ``int(1280·ch//440)`` channels → act → mean pool →
  dropout → linear initialised to **zeros**.
* γ-scaled SiLU (official γ 1.7881293296813965); α = 0.2; expected variance reset after each
  stage's first block.

Parameter names follow timm's ``nf_regnet_b*`` layout (``stem.conv``, ``stages.S.B.{conv1, conv2,
attn.fc1/fc2, conv3, downsample.conv}``, ``final.conv``, ``head.fc``) plus ``skip_gain.gain``.

Deviations from timm's ``nf_regnet_b*`` (which is "NOT to paper spec", its own words): timm rounds
widths to multiples of 8 (``ch_div=8``), uses a fixed 1280-channel final conv, folds γ into the
convs, pads symmetrically, has no SkipInit gain (it zero-inits the last conv's gain instead) and
an N(0, 0.01) classifier. Here each of these follows the official code, so the parameter counts
are the official ones (B1: 10.019M here, 10.22M in timm).
"""

from __future__ import annotations

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

__all__ = ["NF_REGNET_VARIANTS", "NFRegNet", "NFRegNetBlock", "NFRegNetVariant"]

PAPER = "Brock, De & Smith 2021, arXiv 2101.08692"


class NFRegNetBlock(NFResidualBlock):
    """NF-RegNet block (official ``nf_regnet.NFBlock``).

    Forward: ``out = act(x)·beta_multiplier``; shortcut ``downsample(out)`` or ``x``; branch
    ``conv1 → act → conv2 → attn (×2 SE) → act → conv3``; then
    ``branch_probe → drop_path → skip_gain → ×α`` and ``+ shortcut``.

    Args:
        in_ch / out_ch: block input / output channels.
        stride: stride of ``conv2`` and of the shortcut pool.
        beta_multiplier: ``1/β``, the inverse expected std of the block input.
        alpha: residual scale α.
        expansion: expanded width ratio of the *input* channels.
        group_size: channels per group of the 3×3 conv (8).
        se_ratio: SE hidden channels ``max(1, int(width·se_ratio))`` on the expanded width.
        activation: γ-scaled activation name.
        drop_path_rate: this block's stochastic-depth rate.
        skipinit_init: initial SkipInit gain.
        stage_index: index of the stage holding the block.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        beta_multiplier: float,
        alpha: float,
        expansion: float = 2.25,
        group_size: int = 8,
        se_ratio: float = 0.5,
        activation: str = "silu",
        drop_path_rate: float = 0.0,
        skipinit_init: float = 0.0,
        stage_index: int = 0,
    ) -> None:
        super().__init__(
            in_ch, out_ch, stride, beta_multiplier, alpha, nf_activation(activation),
            drop_path_rate=drop_path_rate, skipinit_init=skipinit_init, stage_index=stage_index,
        )  # fmt: skip
        width, groups = grouped_width(in_ch, expansion, group_size)
        self.width, self.groups = width, groups
        if self.is_transition:
            self.downsample = AvgPoolShortcut(in_ch, out_ch, stride)
        self.conv1 = ScaledStdConv2d(in_ch, width, 1)
        self.conv2 = ScaledStdConv2d(width, width, 3, stride=stride, groups=groups)
        self.attn = SqueezeExcite(width, max(1, int(width * se_ratio)), gate_gain=2.0)
        self.conv3 = ScaledStdConv2d(width, out_ch, 1)

    def branch(self, out: torch.Tensor) -> torch.Tensor:
        r = self.attn(self.conv2(self.act(self.conv1(out))))
        return self.conv3(self.act(r))

    def branch_folded(self, a: torch.Tensor, in_scale: float) -> torch.Tensor | None:
        """``α·g·branch(a·in_scale)`` with every scale in the conv weights (see
        :class:`~normfree.nn.NFResidualBlock`)."""
        shortcut = None if self.downsample is None else self.downsample.conv
        if not self.can_fold(self.conv1, self.conv2, self.conv3, shortcut):
            return None
        phi, gamma = self.act_fresh, self.act.gamma
        r = self.conv2.forward_scaled(phi(self.conv1.forward_scaled(a, in_scale)), gamma)
        r = self.attn(r)
        return self.conv3.forward_scaled(phi(r), gamma, self.alpha, self.skip_gain.gain)

    def shortcut_folded(self, a: torch.Tensor, in_scale: float) -> torch.Tensor:
        return self.downsample.conv.forward_scaled(self.downsample.pool(a), in_scale)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha:g}, beta_multiplier={self.beta_multiplier:.6f}, "
            f"width={self.width}, groups={self.groups}"
        )


class NFRegNet(NormFreeModel):
    """Normalizer-free RegNet (Brock et al. 2021a), official ``nf_regnet.NF_RegNet``.

    Args:
        depths: blocks per stage.
        widths: stage widths before ``width_mult``.
        num_classes: classifier size (0: pooled features out).
        in_chans: input channels.
        width_mult: width multiplier (0.75; every width is ``int(w·width_mult)``).
        expansion: expanded-width ratio of the block input (the first block uses 1).
        group_size: channels per group of the 3×3 convs.
        se_ratio: squeeze-excite ratio of the expanded width.
        alpha: residual scale α.
        activation: γ-scaled activation (``"silu"``, as in the official config; the official
            constructor default ``'swish'`` is not in its own activation table).
        stochdepth_rate: network-wide stochastic-depth rate (``rate·i/N``; official config 0.1).
        drop_rate: dropout before the classifier.
        final_channels: channels of the final 1×1 conv (default ``int(1280·ch//440)``).
        skipinit_init: initial value of every SkipInit gain.
        meta: the model's :class:`ModelMeta` (``drop_rate``/``stochdepth_rate`` are filled in).
    """

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 0.75,
        expansion: float = 2.25,
        group_size: int = 8,
        se_ratio: float = 0.5,
        alpha: float = 0.2,
        activation: str = "silu",
        stochdepth_rate: float = 0.1,
        drop_rate: float = 0.2,
        final_channels: int | None = None,
        skipinit_init: float = 0.0,
        meta: ModelMeta | None = None,
    ) -> None:
        super().__init__()
        check_block_activation(activation)
        if len(depths) != len(widths) or not depths:
            raise ValueError(
                "depths and widths need one entry per stage (at least one), got "
                f"{len(depths)} and {len(widths)}"
            )
        if any(d < 1 for d in depths):
            raise ValueError(f"every stage needs at least one block, got depths {list(depths)}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        self.in_chans = in_chans
        ch = int(widths[0] * width_mult)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", ScaledStdConv2d(in_chans, ch, 3, stride=2))
        reduction = 2
        self.feature_info = [FeatureInfo("stem", ch, reduction)]

        variance = ExpectedVariance(alpha)
        rates = stochastic_depth_rates(stochdepth_rate, sum(depths))
        block_idx = 0
        self.stages = nn.ModuleList()
        for s, (depth, width) in enumerate(zip(depths, widths)):
            out_ch = int(width * width_mult)
            blocks = []
            for b in range(depth):
                blocks.append(
                    NFRegNetBlock(
                        ch, out_ch, 2 if b == 0 else 1,
                        beta_multiplier=variance.next_block(first_in_stage=b == 0),
                        alpha=alpha, expansion=1.0 if block_idx == 0 else expansion,
                        group_size=group_size, se_ratio=se_ratio, activation=activation,
                        drop_path_rate=rates[block_idx], skipinit_init=skipinit_init,
                        stage_index=s,
                    )
                )  # fmt: skip
                ch, block_idx = out_ch, block_idx + 1
            reduction *= 2
            self.stages.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"stages.{s}", out_ch, reduction))
        self.expected_variances = list(variance.history)

        final_ch = int(1280 * ch // 440) if final_channels is None else int(final_channels)
        if final_ch < 1:
            raise ValueError(f"final_channels must be >= 1, got {final_ch}")
        self.final = nn.Sequential()
        self.final.add_module("conv", ScaledStdConv2d(ch, final_ch, 1))
        self.final.add_module("act", nf_activation(activation))
        self.head = ClassifierHead(final_ch, num_classes, drop_rate=drop_rate, init_std=0.0)
        self.meta = meta or ModelMeta(name="nf_regnet", family="nf_regnet", paper=PAPER)
        self.meta = self.meta.with_updates(drop_rate=drop_rate, stochdepth_rate=stochdepth_rate)


# ----------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class NFRegNetVariant:
    """One row of the official ``base.nf_regnet_params``."""

    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    train_size: int
    test_size: int
    drop_rate: float
    weight_decay: float | None  # experiment_nf_regnets.py (defined for B0–B5 only)


NF_REGNET_VARIANTS: dict[str, NFRegNetVariant] = {
    "B0": NFRegNetVariant((48, 104, 208, 440), (1, 3, 6, 6), 192, 224, 0.2, 5e-5),
    "B1": NFRegNetVariant((48, 104, 208, 440), (2, 4, 7, 7), 224, 256, 0.2, 6e-5),
    "B2": NFRegNetVariant((56, 112, 232, 488), (2, 4, 8, 8), 240, 272, 0.3, 7e-5),
    "B3": NFRegNetVariant((56, 128, 248, 528), (2, 5, 9, 9), 288, 320, 0.3, 8e-5),
    "B4": NFRegNetVariant((64, 144, 288, 616), (2, 6, 11, 11), 320, 384, 0.4, 9e-5),
    "B5": NFRegNetVariant((80, 168, 336, 704), (3, 7, 14, 14), 384, 456, 0.4, 1e-4),
    "B6": NFRegNetVariant((88, 184, 376, 792), (3, 8, 16, 16), 448, 528, 0.5, None),
    "B7": NFRegNetVariant((96, 208, 416, 880), (4, 10, 19, 19), 512, 600, 0.5, None),
    "B8": NFRegNetVariant((104, 232, 456, 968), (4, 11, 22, 22), 600, 672, 0.5, None),
}


def _nf_regnet(variant: str, num_classes: int, **overrides: Any) -> NFRegNet:
    v = NF_REGNET_VARIANTS[variant]
    # Official experiment_nf_regnets.py: SGD + Nesterov without AGC, lr 0.4 at batch 1024,
    # 360 epochs, MixUp + CutMix, EMA 0.99999, per-variant weight decay.
    recipe: dict[str, Any] = {"agc": False}
    if v.weight_decay is not None:
        recipe["weight_decay"] = v.weight_decay
    meta = ModelMeta(
        name=f"nf_regnet_{variant.lower()}", family="nf_regnet", train_size=v.train_size,
        test_size=v.test_size, recipe=recipe, paper=PAPER,
    )  # fmt: skip
    kwargs: dict[str, Any] = dict(depths=v.depths, widths=v.widths, drop_rate=v.drop_rate)
    kwargs.update(overrides)
    return NFRegNet(num_classes=num_classes, meta=meta, **kwargs)


@register_model
def nf_regnet_b0(num_classes: int = 1000, **overrides: Any) -> NFRegNet:
    """NF-RegNet-B0: 8.595M parameters, 0.444B MACs at 224 px (train 192 px)."""
    return _nf_regnet("B0", num_classes, **overrides)


@register_model
def nf_regnet_b1(num_classes: int = 1000, **overrides: Any) -> NFRegNet:
    """NF-RegNet-B1: 10.019M parameters, 0.734B MACs at 256 px (train 224 px)."""
    return _nf_regnet("B1", num_classes, **overrides)


@register_model
def nf_regnet_b2(num_classes: int = 1000, **overrides: Any) -> NFRegNet:
    """NF-RegNet-B2: 13.786M parameters, 1.099B MACs at 272 px (train 240 px)."""
    return _nf_regnet("B2", num_classes, **overrides)


@register_model
def nf_regnet_b3(num_classes: int = 1000, **overrides: Any) -> NFRegNet:
    """NF-RegNet-B3: 18.137M parameters, 1.999B MACs at 320 px (train 288 px)."""
    return _nf_regnet("B3", num_classes, **overrides)


@register_model
def nf_regnet_b4(num_classes: int = 1000, **overrides: Any) -> NFRegNet:
    """NF-RegNet-B4: 29.316M parameters, 4.467B MACs at 384 px (train 320 px)."""
    return _nf_regnet("B4", num_classes, **overrides)


@register_model
def nf_regnet_b5(num_classes: int = 1000, **overrides: Any) -> NFRegNet:
    """NF-RegNet-B5: 48.707M parameters, 10.561B MACs at 456 px (train 384 px)."""
    return _nf_regnet("B5", num_classes, **overrides)


@register_model
def nf_regnet_b6(num_classes: int = 1000, **overrides: Any) -> NFRegNet:
    """NF-RegNet-B6: 70.046M parameters, 19.687B MACs at 528 px (train 448 px)."""
    return _nf_regnet("B6", num_classes, **overrides)


@register_model
def nf_regnet_b7(num_classes: int = 1000, **overrides: Any) -> NFRegNet:
    """NF-RegNet-B7: 101.743M parameters, 37.448B MACs at 600 px (train 512 px)."""
    return _nf_regnet("B7", num_classes, **overrides)


@register_model
def nf_regnet_b8(num_classes: int = 1000, **overrides: Any) -> NFRegNet:
    """NF-RegNet-B8: 142.314M parameters, 63.719B MACs at 672 px (train 600 px)."""
    return _nf_regnet("B8", num_classes, **overrides)
