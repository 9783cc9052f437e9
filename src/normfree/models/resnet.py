"""Pre-activation baselines with the NF-ResNet topology: BN, WS+GN, GN, LN, GN+PN, LN+PN,
SkipInit and ReZero ResNets - one implementation, the variants are constructor options.

Every model here has exactly the layout of :class:`~normfree.models.nf_resnet.NFResNet` (same
stems, stage widths, strides, bottleneck/basic blocks, a strided 1×1 projection shortcut on the
*pre-activated* input at transitions, head ``final → pool → dropout → linear N(0, 0.01)``), so
results can be compared side by side. Only what sits around the convolutions changes:

* ``bn_resnet*`` - ResNetV2 (He et al. 2016, arXiv 1603.05027): ``BN → ReLU → Conv``, He fan-in
  init, bias-free convs, a final ``BN → ReLU`` before the pool; the BN baselines of Brock et al.
  2021a (DeepMind ``nfnets/resnet.py``, ``ResBlockV2``). Batch dependent
  (``meta.uses_batch_stats``); ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` works unchanged.
* ``wsgn_resnet*`` - Weight Standardization + GroupNorm (Qiao et al. 2019, arXiv 1903.10520; Wu
  & He 2018, arXiv 1803.08494): ``GN → ReLU → WSConv`` (``(W − μ)/(σ_unbiased + 1e-5)``).
  Groups: :func:`group_norm_groups` (32, at least 2 channels per group: 8/16/32 for 16/32/64).
* ``gn_resnet*`` / ``ln_resnet*`` - plain GroupNorm / LayerNorm with affine, ReLU and He-init
  convs (no WS): the comparison baselines of Proxy Normalization. LayerNorm normalizes each
  example over (C, H, W), i.e. GroupNorm with one group (Labatie et al. 2021, §2).
* ``gnpn_resnet*`` / ``lnpn_resnet*`` - Proxy Normalization (Labatie, Masters, Eaton-Rosen &
  Luschi 2021, arXiv 2106.03743): every ``norm → ReLU`` becomes ``norm (no affine) → PN-Act``
  (:class:`~normfree.nn.ProxyNormActivation`: affine, ReLU, then normalization by the moments of
  the activated Gaussian proxy ``N(β̃, (1+γ̃)²)``). PN replaces every activation that follows a
  norm; in a pre-activation ResNet every norm is followed by a ReLU, so every norm loses its
  affine. The final ``norm → act`` before the pool is the paper's "Top": its PN-Act only subtracts
  the proxy mean (``ProxyNormActivation(scale=False)``; the per-channel scale is absorbed by the
  classifier). The proxy parameters γ̃, β̃ take weight decay (:meth:`no_weight_decay_names`).
* ``skipinit_resnet*`` - SkipInit (De & Smith 2020, arXiv 2002.10444): no normalization, He
  fan-in convs, ``x + g·f(x)`` with one scalar :class:`~normfree.nn.SkipInitGain` ``g`` (init
  ``skipinit_init = 0``) per block. ``use_biases=True`` puts one learnable scalar bias where BN's
  offset would be (before every ReLU; the paper's regularized ImageNet variant, with
  ``drop_rate``). Registered up to ``skipinit_resnet_cifar10004`` (Fixup's 10,000 layers).
* ``rezero_resnet_cifar*`` - ReZero (Bachlechner et al. 2020, arXiv 2003.04887):
  ``x + α·F(x)`` with a learnable scalar α initialised to 0. ``rezero=True`` adds this α to the
  blocks of any variant (e.g. ``bn_resnet50(rezero=True)``). Without normalization it is
  *identical* to SkipInit: same scalar, same place (the end of the branch, before the addition),
  same init, and a pre-activation block has no activation after the addition (ReZero's
  requirement). The registered ``rezero_resnet_cifar*`` are therefore aliases of
  ``skipinit_resnet_cifar*`` that differ only in ``meta`` (name, family, paper). (In ReZero's
  Transformers one α is shared by all sub-layers of a layer; a ResNet block has one branch.)

Block (bottleneck; the basic block drops ``norm3/act3/conv3`` and has two 3×3 convs)::

    out = act1(norm1(x))                       # pre-activation (PN-Act with proxy_norm)
    shortcut = downsample(out) if transition else x
    r = conv1(out)                             # 1×1
    r = conv2(act2(norm2(r)))                  # 3×3, stride
    r = conv3(act3(norm3(r)))                  # 1×1
    r = branch_probe(r) → drop_path → skip_gain (SkipInit / ReZero only)
    return r + shortcut
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from normfree.models.base import FeatureInfo, ModelMeta, NormFreeModel
from normfree.models.layouts import (
    check_resnet_layout,
    imagenet_layout,
    resnet_stem,
    small_image_layout,
)
from normfree.models.registry import register_model
from normfree.nn.conv import HeConv2d
from normfree.nn.fixup import ScalarBias
from normfree.nn.head import ClassifierHead
from normfree.nn.norm import group_norm_groups
from normfree.nn.proxy_norm import ProxyNormActivation, proxy_norm_decay_names
from normfree.nn.residual import (
    ResidualBlock,
    SkipInitGain,
    StochasticDepth,
    stochastic_depth_rates,
)
from normfree.nn.ws import WSConv2d

__all__ = [
    "PreActResNet",
    "PreActResNetBlock",
    "resnet_family",
    "skipinit_resnet_cifar",
]

_PN = "Labatie, Masters, Eaton-Rosen & Luschi 2021, arXiv 2106.03743 (Proxy Normalization)"
PAPERS = {
    "bn_resnet": "He, Zhang, Ren & Sun 2016, arXiv 1603.05027 (ResNetV2); Ioffe & Szegedy 2015",
    "wsgn_resnet": "Qiao et al. 2019, arXiv 1903.10520 (WS); Wu & He 2018, arXiv 1803.08494 (GN)",
    "gn_resnet": "Wu & He 2018, arXiv 1803.08494 (GroupNorm)",
    "ln_resnet": "Ba, Kiros & Hinton 2016, arXiv 1607.06450 (LayerNorm); " + _PN,
    "gnpn_resnet": _PN,
    "lnpn_resnet": _PN,
    "skipinit_resnet": "De & Smith 2020, arXiv 2002.10444",
    "rezero_resnet": "Bachlechner et al. 2020, arXiv 2003.04887 (ReZero)",
}
#: Registered variants: family → PreActResNet options.
VARIANTS: dict[str, dict[str, Any]] = {
    "bn_resnet": dict(norm="batch"),
    "wsgn_resnet": dict(norm="group", use_ws=True),
    "gn_resnet": dict(norm="group", use_ws=False),
    "ln_resnet": dict(norm="layer", use_ws=False),
    "gnpn_resnet": dict(norm="group", proxy_norm=True),
    "lnpn_resnet": dict(norm="layer", proxy_norm=True),
    "skipinit_resnet": dict(norm="none"),
    "rezero_resnet": dict(norm="none", rezero=True),  # identical to skipinit (module docstring)
}
_NORMS = ("batch", "group", "layer", "none")


def resnet_family(norm: str, use_ws: bool, proxy_norm: bool, rezero: bool) -> str:
    """The family name of a PreActResNet configuration (``"bn_resnet"``, ``"lnpn_resnet"``,
    ``"rezero_bn_resnet"``…)."""
    if norm == "none":
        return "rezero_resnet" if rezero else "skipinit_resnet"
    base = {"batch": "bn", "group": "gn", "layer": "ln"}[norm]
    family = ("ws" if use_ws else "") + base + ("pn" if proxy_norm else "") + "_resnet"
    return ("rezero_" + family) if rezero else family


class _Layers:
    """Factory of the layers that change between the variants (convs, norms, activations)."""

    def __init__(
        self,
        norm: str,
        use_ws: bool | None,
        use_biases: bool,
        gn_groups: int,
        gn_min_channels: int,
        proxy_norm: bool,
        norm_eps: float,
    ) -> None:
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if use_ws is None:  # WS by default only for the WS+GN baseline
            use_ws = norm == "group" and not proxy_norm
        if use_ws and norm == "none":
            raise ValueError("use_ws=True needs a norm after the convs (norm='none' given)")
        if proxy_norm and norm == "none":
            raise ValueError("proxy_norm=True needs norm='batch', 'group' or 'layer'")
        if use_biases and norm != "none":
            raise ValueError(f"use_biases applies to norm='none' only (norm={norm!r} given)")
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {norm_eps}")
        self.norm_kind = norm
        self.use_ws = bool(use_ws)
        self.use_biases = use_biases
        self.gn_groups = gn_groups
        self.gn_min_channels = gn_min_channels
        self.proxy_norm = proxy_norm
        self.norm_eps = float(norm_eps)

    def conv(self, in_ch: int, out_ch: int, k: int, stride: int = 1) -> nn.Module:
        if self.use_ws:
            return WSConv2d(in_ch, out_ch, k, stride=stride, padding="same", bias=False)
        return HeConv2d(in_ch, out_ch, k, stride=stride, bias=False)

    def norm(self, channels: int) -> nn.Module:
        """The norm layer; without affine when PN-Act follows (the PN-Act holds γ, β)."""
        affine = not self.proxy_norm
        if self.norm_kind == "batch":
            return nn.BatchNorm2d(channels, eps=self.norm_eps, affine=affine)
        if self.norm_kind == "group":
            groups = group_norm_groups(channels, self.gn_groups, self.gn_min_channels)
            return nn.GroupNorm(groups, channels, eps=self.norm_eps, affine=affine)
        if self.norm_kind == "layer":
            return nn.GroupNorm(1, channels, eps=self.norm_eps, affine=affine)
        return ScalarBias() if self.use_biases else nn.Identity()

    def act(self, channels: int, top: bool = False) -> nn.Module:
        """ReLU, or PN-Act (``top``: mean subtraction only) with ``proxy_norm``."""
        if not self.proxy_norm:
            return nn.ReLU()
        return ProxyNormActivation(channels, "relu", scale=not top)


class PreActResNetBlock(ResidualBlock):
    """Pre-activation residual block ``x + f(x)`` (ResNetV2) with BN, GN, LN (each optionally
    with PN-Act), or no normalization (see the module docstring for the forward pass).

    Args:
        layers: the family's layer factory (internal).
        skipinit: multiply the branch by a scalar gain (SkipInit / ReZero, init ``skipinit_init``).
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
        self.skip_gain = SkipInitGain(skipinit_init) if skipinit else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        r = self.conv2(self.act2(self.norm2(self.conv1(out))))
        if self.conv3 is not None and self.norm3 is not None and self.act3 is not None:
            r = self.conv3(self.act3(self.norm3(r)))
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
        norm: ``"batch"`` (BN), ``"group"`` (GN), ``"layer"`` (LN over (C, H, W) = GN with one
            group) or ``"none"`` (SkipInit: a scalar gain per block).
        use_ws: Qiao-WS convs (needs a norm); ``None``: WS only for ``norm="group"`` without PN
            (the WS+GN baseline), He-init convs otherwise.
        proxy_norm: norms without affine followed by PN-Act (ReLU) instead of ``norm → ReLU``;
            the final activation keeps mean subtraction only (``ProxyNormActivation(scale=False)``).
        rezero: a scalar gain α (init ``skipinit_init`` = 0) on every branch, with any norm
            (always on for ``norm="none"``).
        use_biases: with ``norm="none"``, a scalar bias before every ReLU.
        skipinit_init: initial SkipInit / ReZero gain.
        gn_groups / gn_min_channels_per_group: see :func:`group_norm_groups`.
        norm_eps: ε of BN / GN / LN.
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
        use_ws: bool | None = None,
        proxy_norm: bool = False,
        rezero: bool = False,
        use_biases: bool = False,
        skipinit_init: float = 0.0,
        gn_groups: int = 32,
        gn_min_channels_per_group: int = 2,
        norm_eps: float = 1e-5,
        stochdepth_rate: float = 0.0,
        drop_rate: float = 0.0,
        meta: ModelMeta | None = None,
    ) -> None:
        super().__init__()
        check_resnet_layout(depths, channels, strides, stem)
        layers = _Layers(
            norm, use_ws, use_biases, gn_groups, gn_min_channels_per_group, proxy_norm, norm_eps
        )
        self.in_chans = in_chans
        self.stem, reduction = resnet_stem(stem, in_chans, stem_channels, layers.conv)
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
                        drop_path_rate=rates[block_idx], skipinit=rezero or norm == "none",
                        skipinit_init=skipinit_init, stage_index=s,
                    )
                )  # fmt: skip
                in_ch, block_idx = out_ch, block_idx + 1
            reduction *= stride
            self.stages.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"stages.{s}", out_ch, reduction))
        self.final = nn.Sequential()
        self.final.add_module("norm", layers.norm(in_ch))
        self.final.add_module("act", layers.act(in_ch, top=True))
        self.head = ClassifierHead(in_ch, num_classes, drop_rate=drop_rate, init_std=0.01)
        if meta is None:
            family = resnet_family(norm, layers.use_ws, proxy_norm, rezero)
            meta = ModelMeta(name=family, family=family, paper=PAPERS.get(family, ""))
        self.meta = meta.with_updates(
            drop_rate=drop_rate, stochdepth_rate=stochdepth_rate,
            uses_batch_stats=norm == "batch", recipe={"agc": False, **meta.recipe},
        )  # fmt: skip

    def no_weight_decay_names(self) -> set[str]:
        """Every ``ndim ≤ 1`` tensor except the PN proxy parameters γ̃, β̃, which the paper
        decays towards the N(0, 1) proxy (Labatie et al. 2021)."""
        return super().no_weight_decay_names() - proxy_norm_decay_names(self)


# ----------------------------------------------------------------------------- registry
def _build(
    family: str, depth: int, small: bool, num_classes: int, overrides: dict[str, Any]
) -> PreActResNet:
    if small:
        name, size = f"{family}_cifar{depth}", 32
        kwargs = small_image_layout(depth, overrides.pop("width", 1))
    else:
        name, size = f"{family}{depth}", 224
        kwargs = imagenet_layout(depth)
    meta = ModelMeta(
        name=name, family=family, train_size=size, test_size=size, paper=PAPERS[family]
    )
    kwargs.update(VARIANTS[family])
    kwargs.update(overrides)
    return PreActResNet(num_classes=num_classes, meta=meta, **kwargs)


def skipinit_resnet_cifar(depth: int, num_classes: int = 10, **overrides: Any) -> PreActResNet:
    """Small-image SkipInit ResNet of any depth ``6n+2`` (the registered names fix the depth;
    ``width`` multiplies the 16/32/64 channels)."""
    return _build("skipinit_resnet", depth, True, num_classes, overrides)


_DOCS = {
    "bn_resnet": "BN-ResNetV2 (BN→ReLU→Conv, He et al. 2016), NF-ResNet topology",
    "wsgn_resnet": "WS + GroupNorm pre-activation ResNet (Qiao et al. 2019)",
    "gn_resnet": "GroupNorm (affine) + ReLU pre-activation ResNet, He-init convs, no WS",
    "ln_resnet": "LayerNorm over (C,H,W) (affine) + ReLU pre-activation ResNet, no WS",
    "gnpn_resnet": "GroupNorm (no affine) + PN-Act(ReLU) pre-activation ResNet (Labatie 2021)",
    "lnpn_resnet": "LayerNorm (no affine) + PN-Act(ReLU) pre-activation ResNet (Labatie 2021)",
    "skipinit_resnet": "SkipInit ResNetV2 (De & Smith 2020): no norm, x + g·f(x), g init 0",
    "rezero_resnet": "ReZero ResNet (Bachlechner 2020); identical to skipinit_resnet (alias)",
}
_REGISTERED: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # family: (ImageNet depths, small-image depths)
    "bn_resnet": ((26, 50, 101, 152), (20, 56, 110)),
    "wsgn_resnet": ((50, 101), (20, 56, 110)),
    "gn_resnet": ((50,), (20, 56)),
    "ln_resnet": ((50,), (20, 56)),
    "gnpn_resnet": ((50,), (20, 56)),
    "lnpn_resnet": ((50,), (20, 56)),
    "skipinit_resnet": ((50, 101), (20, 56, 110, 1202, 10004)),
    "rezero_resnet": ((), (20, 56, 110)),
}


def _register(family: str, depth: int, small: bool) -> None:
    default_classes = 10 if small else 1000

    def entry(num_classes: int = default_classes, **overrides: Any) -> PreActResNet:
        return _build(family, depth, small, num_classes, overrides)

    name = f"{family}_cifar{depth}" if small else f"{family}{depth}"
    kind = (
        "Small-image (3×3 stem, basic blocks, ``width``·16/32/64 channels)"
        if small
        else "ImageNet (bottleneck)"
    )
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"{kind} {_DOCS[family]}; depth {depth}."
    globals()[name] = register_model(entry)


for _family, (_imagenet_depths, _small_depths) in _REGISTERED.items():
    for _depth in _imagenet_depths:
        _register(_family, _depth, small=False)
    for _depth in _small_depths:
        _register(_family, _depth, small=True)
