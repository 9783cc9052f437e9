"""Normalized pre-activation ResNets with the NF-ResNet topology: the BN, WS+GN, GN, LN, GN+PN
and LN+PN baselines (one norm spec each, :func:`normfree.nn.norm_layers`), optionally with a
ReZero gain on every branch.

Every model here has exactly the layout of :class:`~normfree.models.nf_resnet.NFResNet` (same
stems, stage widths, strides, bottleneck/basic blocks, a strided 1×1 projection shortcut on the
*pre-activated* input at transitions, head ``final → pool → dropout → linear N(0, 0.01)``), so
results can be compared side by side. Only what sits around the convolutions changes:

* ``bn_resnet*`` (spec ``"bn"``) - ResNetV2 (He et al. 2016, arXiv 1603.05027): ``BN → ReLU →
  Conv``, He fan-in init, bias-free convs, a final ``BN → ReLU`` before the pool; the BN baselines
  of Brock et al. 2021a (DeepMind ``nfnets/resnet.py``, ``ResBlockV2``). Batch dependent
  (``meta.uses_batch_stats``); ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` works unchanged.
* ``wsgn_resnet*`` (``"wsgn"``) - Weight Standardization + GroupNorm (Qiao et al. 2019, arXiv
  1903.10520; Wu & He 2018, arXiv 1803.08494): ``GN → ReLU → WSConv``.
* ``gn_resnet*`` / ``ln_resnet*`` (``"gn"`` / ``"ln"``) - plain GroupNorm / LayerNorm with affine,
  ReLU and He-init convs: the comparison baselines of Proxy Normalization.
* ``gnpn_resnet*`` / ``lnpn_resnet*`` (``"gnpn"`` / ``"lnpn"``) - Proxy Normalization (Labatie,
  Masters, Eaton-Rosen & Luschi 2021, arXiv 2106.03743): every ``norm → ReLU`` becomes ``norm (no
  affine) → PN-Act``; in a pre-activation ResNet every norm is followed by a ReLU, so every norm
  loses its affine. The final ``norm → act`` before the pool is the paper's "Top": its PN-Act only
  subtracts the proxy mean. The proxy parameters γ̃, β̃ take weight decay.
* ``rezero=True`` - ReZero (Bachlechner et al. 2020, arXiv 2003.04887): ``x + α·F(x)`` with one
  learnable scalar α per block, initialised to 0, on any of the above (e.g.
  ``bn_resnet50(rezero=True)``). Without normalization ReZero is SkipInit:
  :mod:`normfree.models.skipinit_resnet`.

The block is :class:`normfree.nn.PreActBlock` (forward pass in its docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from normfree.models.base import ModelMeta
from normfree.models.layouts import (
    PreActResNetBase,
    register_depths,
    variant_layout,
)
from normfree.nn.norm import NormSpec, norm_layers
from normfree.nn.preact import PreActBlock
from normfree.nn.proxy_norm import proxy_norm_decay_names

__all__ = ["PAPERS", "PreActResNet", "PreActResNetBlock", "resnet_family"]

PreActResNetBlock = PreActBlock  # the block of every model in this file

_PN = "Labatie, Masters, Eaton-Rosen & Luschi 2021, arXiv 2106.03743 (Proxy Normalization)"
PAPERS = {
    "bn_resnet": "He, Zhang, Ren & Sun 2016, arXiv 1603.05027 (ResNetV2); Ioffe & Szegedy 2015",
    "wsgn_resnet": "Qiao et al. 2019, arXiv 1903.10520 (WS); Wu & He 2018, arXiv 1803.08494 (GN)",
    "gn_resnet": "Wu & He 2018, arXiv 1803.08494 (GroupNorm)",
    "ln_resnet": "Ba, Kiros & Hinton 2016, arXiv 1607.06450 (LayerNorm); " + _PN,
    "gnpn_resnet": _PN,
    "lnpn_resnet": _PN,
}


def resnet_family(norm: NormSpec, rezero: bool = False) -> str:
    """The family name of a configuration: ``"bn_resnet"``, ``"lnpn_resnet"``,
    ``"rezero_bn_resnet"``…"""
    return ("rezero_" if rezero else "") + f"{norm}_resnet"


class PreActResNet(PreActResNetBase):
    """Pre-activation ResNet with the NF-ResNet topology and one normalization scheme.

    Args:
        depths / channels / strides: blocks, output channels and stride per stage.
        num_classes: classifier size (0: no classifier).
        in_chans: input channels.
        stem: ``"imagenet"`` (7×7/2 conv + 3×3/2 SAME max-pool) or ``"small"`` (3×3/1 conv).
        stem_channels: channels of the stem conv.
        bottleneck: bottleneck (1×1–3×3–1×1, ratio 0.25) or basic (3×3–3×3) blocks.
        norm: ``"bn"``, ``"gn"``, ``"ln"``, ``"gnpn"``, ``"lnpn"`` or ``"wsgn"``
            (:mod:`normfree.nn.norm`).
        rezero: a scalar gain α (init ``rezero_init``) on every branch.
        rezero_init: initial ReZero α.
        gn_groups / gn_min_channels_per_group: see :func:`normfree.nn.group_norm_groups`.
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
        norm: NormSpec = "bn",
        rezero: bool = False,
        rezero_init: float = 0.0,
        gn_groups: int = 32,
        gn_min_channels_per_group: int = 2,
        norm_eps: float = 1e-5,
        stochdepth_rate: float = 0.0,
        drop_rate: float = 0.0,
        meta: ModelMeta | None = None,
    ) -> None:
        layers = norm_layers(norm, norm_eps, gn_groups, gn_min_channels_per_group)
        super().__init__(
            layers, depths, channels, strides, stem, stem_channels, in_chans, bottleneck,
            skip_gain=rezero, gain_init=rezero_init, num_classes=num_classes,
            drop_rate=drop_rate, stochdepth_rate=stochdepth_rate,
        )  # fmt: skip
        if meta is None:
            family = resnet_family(norm, rezero)
            meta = ModelMeta(name=family, family=family, paper=PAPERS.get(family, ""))
        self.meta = meta.with_updates(
            drop_rate=drop_rate, stochdepth_rate=stochdepth_rate,
            uses_batch_stats=layers.uses_batch_stats, recipe={"agc": False, **meta.recipe},
        )  # fmt: skip

    def no_weight_decay_names(self) -> set[str]:
        """Every ``ndim ≤ 1`` tensor except the PN proxy parameters γ̃, β̃, which the paper
        decays towards the N(0, 1) proxy (Labatie et al. 2021)."""
        return super().no_weight_decay_names() - proxy_norm_decay_names(self)


# ----------------------------------------------------------------------------- registry
_DOCS = {
    "bn_resnet": "BN-ResNetV2 (BN→ReLU→Conv, He et al. 2016), NF-ResNet topology",
    "wsgn_resnet": "WS + GroupNorm pre-activation ResNet (Qiao et al. 2019)",
    "gn_resnet": "GroupNorm (affine) + ReLU pre-activation ResNet, He-init convs, no WS",
    "ln_resnet": "LayerNorm over (C,H,W) (affine) + ReLU pre-activation ResNet, no WS",
    "gnpn_resnet": "GroupNorm (no affine) + PN-Act(ReLU) pre-activation ResNet (Labatie 2021)",
    "lnpn_resnet": "LayerNorm (no affine) + PN-Act(ReLU) pre-activation ResNet (Labatie 2021)",
}
_REGISTERED: dict[NormSpec, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # norm spec: (ImageNet depths, small-image depths)
    "bn": ((26, 50, 101, 152), (20, 56, 110)),
    "wsgn": ((50, 101), (20, 56, 110)),
    "gn": ((50,), (20, 56)),
    "ln": ((50,), (20, 56)),
    "gnpn": ((50,), (20, 56)),
    "lnpn": ((50,), (20, 56)),
}


def _build_for(norm: NormSpec) -> Callable[[int, bool, int, dict[str, Any]], PreActResNet]:
    family = resnet_family(norm)

    def build(depth: int, small: bool, num_classes: int, overrides: dict[str, Any]) -> PreActResNet:
        layout, meta = variant_layout(family, depth, small, PAPERS[family], overrides)
        kwargs = {**layout, "norm": norm, **overrides}
        return PreActResNet(num_classes=num_classes, meta=meta, **kwargs)

    return build


for _norm, (_imagenet_depths, _small_depths) in _REGISTERED.items():
    _family = resnet_family(_norm)
    register_depths(
        _family, _DOCS[_family], _imagenet_depths, _small_depths, _build_for(_norm), globals()
    )
