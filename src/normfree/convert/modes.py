"""The conversion modes: graph surgery on a traced BatchNorm network (see :mod:`.graph`).

With BN's eval transform ``BN(z) = s·(z − μ) + β``, ``s = γ/√(σ² + ε)`` (Ioffe & Szegedy 2015,
Alg. 1, running statistics μ, σ²), a conv ``z = W∗x + b`` followed by BN is the conv with
``W_f = s·W`` and ``b_f = s·(b − μ) + β`` (per output channel).

* ``"bn_free"`` (exact): every Conv→BN becomes one conv with ``(W_f, b_f)``; every residual
  branch ``h + F(h)`` becomes ``h + g·F(h)`` with a learnable scalar ``g`` initialised to 1
  (:class:`normfree.nn.SkipInitGain`; SkipInit, De & Smith 2020, starts it at 0 instead). The
  outputs equal the BN model's eval outputs up to float rounding.
* ``"nf"`` (normalizer-free): every Conv→BN becomes a Scaled-WS conv
  (:class:`normfree.nn.ScaledStdConv2d`, Brock et al. 2021a eq. 2:
  ``Ŵ = gain·(W − mean W)/‖W − mean W‖``), which can only express kernels with zero mean per
  output channel. Without data, the raw weight is ``W_f/‖W_f − mean W_f‖`` and the gain
  ``‖W_f − mean W_f‖``, so ``Ŵ = W_f − mean(W_f)``: the folded kernel minus its per-channel mean
  ``m_c``, whose contribution ``m_c·Σx`` over each receptive field is lost. With calibration
  inputs (:func:`calibrate_nf`), each WS conv, visited in graph order on the input that the
  already-fitted network delivers, gets the zero-mean kernel that minimises the variance of
  the lost part, ``Ŵ = W_f − λ·Σ⁻¹1`` (Σ the shrunk covariance of its input patches,
  ``λ = 1ᵀW_f / 1ᵀΣ⁻¹1``; ``nf_fit="mean"`` keeps ``W_f − mean``), and the bias
  ``b_f + (W_f − Ŵ)·E[patch]`` restores the expected output. The per-example, per-position part
  cannot be carried by a bias, so the error is reported, not zero.
  Residual branches get ``h + α·g·F(h)`` (Brock et al. 2021a §3: the NF-ResNet branch scale
  α, here fixed, default 0.2) with the branch's last WS gain and bias divided by α so that the
  function is unchanged, and a learnable ``g = 1``. The input scaling ``1/β`` of NF-ResNets is
  not inserted: it sets the signal scale at *initialisation*, which a converted network takes
  from its trained weights; it would be absorbed exactly into the first WS gain of each branch.
  Likewise the activations are not γ-scaled: for ReLU-family activations ``γ·φ(x)`` is
  absorbed exactly by the next WS gain (positive homogeneity), so it changes nothing.
* ``"gn"``: WS+GN (Qiao et al. 2019): each conv that feeds a BN becomes a
  :class:`normfree.nn.WSConv2d` with the same raw weight; each BN becomes a GroupNorm whose
  affine is BN's (γ, β). Approximate: per-example group statistics replace running statistics.
* ``"gnpn"``: as ``"gn"`` but every BN→activation becomes GN (no affine) → Proxy-Norm
  activation (Labatie et al. 2021, :class:`normfree.nn.NormAct` with ``proxy=True``) with
  ``γ, β`` from BN and the proxy at N(0, 1); a BN without a following activation becomes GN.

A BN whose input is not a conv used only by it (e.g. pre-activation ``BN → ReLU → conv`` after
a residual add) cannot be folded: the BN-free and NF modes raise unless
``standalone_bn="affine"``, which keeps it as a learnable per-channel affine
(:class:`~normfree.convert.layers.ChannelAffine`, exact); the GN modes replace it by a GroupNorm.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from normfree.convert.graph import (
    ELEMENTWISE_ACTIVATIONS,
    ConversionError,
    NormSite,
    describe_input,
    find_norms,
    find_residual_adds,
    is_bn_act,
    is_same_conv,
    is_stochastic_depth,
    norm_channels,
)
from normfree.convert.layers import ChannelAffine, FeatureDropout
from normfree.nn.norm import group_norm_groups
from normfree.nn.proxy_norm import NormAct, ProxyNormActivation
from normfree.nn.residual import SkipInitGain
from normfree.nn.ws import ScaledStdConv2d, WSConv2d

__all__ = [
    "MODES",
    "ConvertOptions",
    "add_residual_gains",
    "bn_scale_shift",
    "calibrate_nf",
    "fold_conv_bn",
    "mark_residual_outputs",
    "replace_norms",
]

MODES: dict[str, str] = {
    "bn_free": "exact: BN folded into its conv, learnable residual gain = 1",
    "nf": "normalizer-free: scaled-WS convs from the folded weights, α-scaled residuals",
    "gn": "WS + GroupNorm with BN's affine (approximate at conversion)",
    "gnpn": "WS + GroupNorm + Proxy-Norm activations with BN's affine (approximate)",
}
_GAIN_PREFIX = "residual_gain_"
_OUT_PREFIX = "residual_out_"


@dataclass(frozen=True)
class ConvertOptions:
    """Options of :func:`normfree.convert.convert_model` (stored with a converted model).

    Attributes:
        standalone_bn: ``"error"`` (default) or ``"affine"``: what the BN-free and NF modes do
            with a BN not fed by a conv (see the module docstring).
        residual_alpha: the NF mode's fixed residual-branch scale α (1 disables it).
        max_groups: the GN modes' group count is the largest divisor of C up to this with at
            least 2 channels per group (:func:`normfree.models.resnet.group_norm_groups`).
        nf_fit: how the NF mode fits its zero-mean WS kernels on calibration data:
            ``"covariance"`` (default; least output error) or ``"mean"`` (WS's own projection,
            with the bias restoring the expected output) (:func:`calibrate_nf`).
        nf_shrinkage: ridge added to the patch covariance, as a fraction of its mean variance.
    """

    standalone_bn: str = "error"
    residual_alpha: float = 0.2
    max_groups: int = 32
    nf_fit: str = "covariance"
    nf_shrinkage: float = 0.1

    def __post_init__(self) -> None:
        if self.standalone_bn not in ("error", "affine"):
            raise ValueError(
                f"standalone_bn must be 'error' or 'affine', got {self.standalone_bn!r}"
            )
        for key in ("residual_alpha", "nf_shrinkage"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not (math.isfinite(value) and value > 0):  # fmt: skip
                raise ValueError(f"{key} must be a positive finite number, got {value!r}")
        if isinstance(self.max_groups, bool) or not isinstance(self.max_groups, int) or \
                self.max_groups < 1:  # fmt: skip
            raise ValueError(f"max_groups must be a positive int, got {self.max_groups!r}")
        if self.nf_fit not in ("mean", "covariance"):
            raise ValueError(f"nf_fit must be 'mean' or 'covariance', got {self.nf_fit!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertOptions:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown conversion options {sorted(unknown)}")
        return cls(**data)


def bn_scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """``(s, t)`` in float64 with ``BN_eval(z) = s·z + t`` per channel (a BatchNorm's running
    statistics and affine, or a frozen BN's buffers)."""
    mean = bn.running_mean.detach().double()
    inv = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * inv
    return scale, beta - mean * scale


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """``(W_f, b_f)`` in float64: the conv equal to ``BN_eval(conv(x))``."""
    scale, shift = bn_scale_shift(bn)
    weight = conv.weight.detach().double() * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else shift + conv.bias.detach().double() * scale
    return weight, bias


def _conv_kwargs(conv: nn.Conv2d, name: str, plain: bool = False) -> dict[str, Any]:
    """The constructor arguments of a conv like ``conv``; ``plain`` (an ``nn.Conv2d``) keeps
    its padding mode, the Weight-Standardized convs take zero padding only."""
    if conv.padding_mode != "zeros" and not plain:
        raise ConversionError(
            f"Conv2d '{name}' uses padding_mode={conv.padding_mode!r}; this mode's convs take "
            "zero padding (bn_free keeps any padding mode)"
        )
    padding = conv.padding
    if isinstance(padding, str):  # torch's "same" / "valid" (stride 1)
        if padding == "valid":
            padding = (0, 0)
        elif all(k % 2 for k in conv.kernel_size):
            padding = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
        else:
            raise ConversionError(
                f"Conv2d '{name}' has padding='same' with an even kernel {conv.kernel_size}; "
                "conversion supports explicit or odd-kernel 'same' padding"
            )
    kwargs = dict(
        in_channels=conv.in_channels, out_channels=conv.out_channels,
        kernel_size=conv.kernel_size, stride=conv.stride, padding=tuple(padding),
        dilation=conv.dilation, groups=conv.groups,
    )  # fmt: skip
    if plain:
        kwargs["padding_mode"] = conv.padding_mode
    return kwargs


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, attr = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, module)


def _drop_node(gm: fx.GraphModule, node: fx.Node, replacement: fx.Node) -> None:
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)


def _placed(module: nn.Module, like: Tensor) -> nn.Module:
    """``module`` on ``like``'s device, its floating tensors in ``like``'s dtype (a float64 or
    a meta-device model gets float64 or meta replacements)."""
    return module.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)


def _reference_tensor(gm: fx.GraphModule, bn: nn.Module) -> Tensor:
    """A tensor whose device and dtype a BN's replacement takes: its running mean, its weight,
    else (a BN with neither) the model's first floating tensor."""
    for t in (getattr(bn, "running_mean", None), getattr(bn, "weight", None)):
        if isinstance(t, Tensor):
            return t
    tensors = [*gm.parameters(), *gm.buffers()]
    return next((t for t in tensors if t.is_floating_point()), torch.zeros(()))


def _like(param: Tensor, value: Tensor) -> Tensor:
    return value.to(dtype=param.dtype, device=param.device)


def _uninitialised(cls: type[nn.Module], like: nn.Conv2d, **kwargs: Any) -> Any:
    """``cls(**kwargs)`` on ``like``'s device and dtype without running its random init (every
    tensor is overwritten by the caller)."""
    w = like.weight
    return torch.nn.utils.skip_init(cls, **kwargs, device=w.device, dtype=w.dtype)


def _scaled_ws_conv(conv: nn.Conv2d, name: str, weight: Tensor, bias: Tensor) -> ScaledStdConv2d:
    """A ScaledStdConv2d whose standardised weight is ``weight − mean(weight)`` per channel."""
    ws = _uninitialised(ScaledStdConv2d, conv, **_conv_kwargs(conv, name), bias=True, eps=1e-4)
    dims = (1, 2, 3)
    norm = torch.linalg.vector_norm(weight - weight.mean(dim=dims, keepdim=True), dim=dims)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    with torch.no_grad():
        ws.weight.copy_(_like(ws.weight, weight / safe.reshape(-1, 1, 1, 1)))
        ws.gain.copy_(_like(ws.gain, norm))
        ws.bias.copy_(_like(ws.bias, bias))
    return ws


def _ws_conv(conv: nn.Conv2d, name: str) -> WSConv2d:
    try:
        ws = _uninitialised(WSConv2d, conv, **_conv_kwargs(conv, name), bias=conv.bias is not None)
    except ValueError as e:
        raise ConversionError(f"Conv2d '{name}': {e}") from e
    with torch.no_grad():
        ws.weight.copy_(conv.weight)
        if conv.bias is not None:
            ws.bias.copy_(conv.bias)
    return ws


def _standalone_error(gm: fx.GraphModule, site: NormSite, mode: str) -> ConversionError:
    return ConversionError(
        f"BatchNorm2d '{site.bn_name}' follows {describe_input(gm, site)}, not a Conv2d used "
        f"only by it: mode '{mode}' folds each BN into the conv that feeds it (Conv→BN(→act)); "
        "pass standalone_bn='affine' (CLI: --standalone-bn affine) to keep such a BN as an "
        "exact learnable per-channel affine, or use mode 'gn' / 'gnpn'"
    )


def _same_conv_error(kind: str, conv_name: str, bn_name: str) -> ConversionError:
    return ConversionError(
        f"BatchNorm2d '{bn_name}' follows {kind} '{conv_name}', which pads \"SAME\" for each "
        "input's size: mode 'nf' has no Weight-Standardized conv with that padding; use mode "
        "'bn_free', or pass standalone_bn='affine' (CLI: --standalone-bn affine) to keep the "
        "conv and the BN as an exact per-channel affine after it"
    )


def _affine_of(bn: nn.Module) -> tuple[Tensor, Tensor]:
    c = norm_channels(bn)
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones(c)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros(c)
    return gamma, beta


def _activation_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    if node.op == "call_module":
        act = copy.deepcopy(gm.get_submodule(str(node.target)))
    else:
        act = {F.relu: nn.ReLU, torch.relu: nn.ReLU, F.relu6: nn.ReLU6, F.silu: nn.SiLU,
               F.gelu: nn.GELU, F.hardswish: nn.Hardswish}[node.target]()  # fmt: skip
    if hasattr(act, "inplace"):
        act.inplace = False
    return act


def replace_norms(
    gm: fx.GraphModule, mode: str, options: ConvertOptions
) -> tuple[dict[str, tuple[Tensor, Tensor]], int, int]:
    """Replace every BN site of ``gm`` (in place) for ``mode``. Returns ``(folded, sites,
    affine)``: for the NF mode the folded ``(W_f, b_f)`` of each WS conv by module name (for
    :func:`calibrate_nf`), the number of BNs replaced and how many became
    :class:`ChannelAffine`. In the NF mode a conv with a fan-in of 1 (a depthwise 1×1) stays a
    plain conv with its BN folded in, as in ``bn_free``: the only zero-mean kernel of one
    weight is 0, which Weight Standardization would make of it."""
    if mode not in MODES:
        raise ConversionError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    sites = find_norms(gm, running_stats=mode in ("bn_free", "nf"))
    folded: dict[str, tuple[Tensor, Tensor]] = {}
    affines = 0
    for site in sites:
        bn = gm.get_submodule(site.bn_name)
        # timm's BatchNormAct2d: its drop → act stay after whatever replaces the BN part
        tail = [copy.deepcopy(bn.drop), copy.deepcopy(bn.act)] if is_bn_act(bn) else []
        conv_name = str(site.conv.target) if site.conv is not None else ""
        conv = gm.get_submodule(conv_name) if site.conv is not None else None
        if is_same_conv(conv) and mode != "bn_free":  # no WS conv pads "SAME" dynamically
            if mode == "nf" and options.standalone_bn != "affine":
                raise _same_conv_error(type(conv).__name__, conv_name, site.bn_name)
            conv = None  # the BN is kept as an affine (nf) or a GroupNorm after it (gn modes)
        if mode in ("bn_free", "nf"):
            if conv is None:
                if options.standalone_bn != "affine":
                    raise _standalone_error(gm, site, mode)
                scale, shift = bn_scale_shift(bn)
                affine = _placed(ChannelAffine(norm_channels(bn)), bn.running_mean)
                with torch.no_grad():
                    affine.weight.copy_(scale)
                    affine.bias.copy_(shift)
                _set_module(gm, site.bn_name, nn.Sequential(affine, *tail) if tail else affine)
                affines += 1
                continue
            weight, bias = fold_conv_bn(conv, bn)
            if is_same_conv(conv):  # the same conv ("SAME" padding) with the folded tensors
                new = copy.deepcopy(conv)
                new.weight = nn.Parameter(_like(conv.weight, weight))
                new.bias = nn.Parameter(_like(conv.weight, bias))
            elif mode == "bn_free" or weight[0].numel() < 2:  # (a fan-in of 1: the docstring)
                new = _uninitialised(nn.Conv2d, conv, **_conv_kwargs(conv, conv_name, plain=True),
                                     bias=True)  # fmt: skip
                with torch.no_grad():
                    new.weight.copy_(weight)
                    new.bias.copy_(bias)
            else:
                new = _scaled_ws_conv(conv, conv_name, weight, bias)
                folded[conv_name] = (weight, bias)
            _set_module(gm, conv_name, new)
            if tail:
                _set_module(gm, site.bn_name, nn.Sequential(*tail))
            else:
                _drop_node(gm, site.bn, site.conv)
            continue
        # GN modes (a BN without running statistics is fine: only γ and β are taken)
        like = _reference_tensor(gm, bn)
        if conv is not None:
            _set_module(gm, conv_name, _ws_conv(conv, conv_name))
        c = norm_channels(bn)
        groups = group_norm_groups(c, options.max_groups)
        gamma, beta = _affine_of(bn)
        if mode == "gnpn" and site.act is not None:
            block = NormAct(c, "gn", proxy=True, activation=_activation_module(gm, site.act),
                            num_groups=groups, eps_norm=bn.eps)  # fmt: skip
            _placed(block, like)
            with torch.no_grad():
                block.act.weight.copy_(gamma)
                block.act.bias.copy_(beta)
            _set_module(gm, site.bn_name, block)
            # (a DropBlock between them now follows it: the same function in eval mode)
            before = site.act.args[0]
            _drop_node(gm, site.act, before if isinstance(before, fx.Node) else site.bn)
        elif mode == "gnpn" and tail and type(tail[1]) in ELEMENTWISE_ACTIVATIONS:
            act = tail[1]
            if hasattr(act, "inplace"):
                act.inplace = False
            pn = _placed(ProxyNormActivation(c, act), like)
            with torch.no_grad():
                pn.weight.copy_(gamma)
                pn.bias.copy_(beta)
            norm = nn.GroupNorm(groups, c, eps=bn.eps, affine=False)
            block = _placed(nn.Sequential(norm, tail[0], pn), like)
            _set_module(gm, site.bn_name, block)
        else:
            norm = _placed(nn.GroupNorm(groups, c, eps=bn.eps, affine=True), like)
            with torch.no_grad():
                norm.weight.copy_(gamma)
                norm.bias.copy_(beta)
            _set_module(gm, site.bn_name, nn.Sequential(norm, *tail) if tail else norm)
    _finish(gm)
    return folded, len(sites), affines


def _zero_mean_fit(
    weight: Tensor, patches: Tensor, groups: int, fit: str, shrinkage: float
) -> tuple[Tensor, Tensor]:
    """The zero-mean kernel ``Ŵ`` (per output channel) closest to ``weight`` and the bias shift
    ``(W − Ŵ)·E[patch]``, both float64; ``patches`` is ``(n, C_in·kh·kw)`` (unfold order).

    ``fit="mean"``: ``Ŵ = W − mean(W)`` (the Euclidean projection WS itself makes).
    ``fit="covariance"``: ``Ŵ = W − λ·Σ⁻¹1`` with ``λ = 1ᵀW / 1ᵀΣ⁻¹1``, Σ the (shrunk) covariance
    of the input patches: the zero-mean kernel minimising ``E[(W·p − Ŵ·p − E[(W − Ŵ)·p])²]``,
    i.e. the output variance of what WS removes, which is then smallest where the input
    varies least."""
    out_ch = weight.shape[0]
    w = weight.reshape(groups, out_ch // groups, -1)  # (G, O/G, N)
    n = w.shape[-1]
    p = patches.double().reshape(patches.shape[0], groups, n).transpose(0, 1)  # (G, rows, N)
    mu = p.mean(dim=1)  # (G, N)
    ones = torch.ones_like(mu).unsqueeze(-1)  # (G, N, 1)
    if fit == "mean":
        direction = ones.squeeze(-1)
    else:
        x = (p - mu.unsqueeze(1)) / max(1, p.shape[1] - 1) ** 0.5  # Σ = xᵀx
        ridge = shrinkage * x.square().sum(dim=(1, 2)).clamp_min(1e-12) / n  # δ per group
        if x.shape[1] >= n:  # primal: (xᵀx + δI)⁻¹ 1
            cov = torch.bmm(x.transpose(1, 2), x)
            cov.diagonal(dim1=-2, dim2=-1).add_(ridge[:, None])
            direction = torch.linalg.solve(cov, ones).squeeze(-1)
        else:  # dual (Woodbury): (1 − xᵀ(xxᵀ + δI)⁻¹x1)/δ, cheaper with few rows
            gram = torch.bmm(x, x.transpose(1, 2))
            gram.diagonal(dim1=-2, dim2=-1).add_(ridge[:, None])
            inner = torch.linalg.solve(gram, torch.bmm(x, ones))
            direction = ((ones - torch.bmm(x.transpose(1, 2), inner)) / ridge[:, None, None])
            direction = direction.squeeze(-1)
    lam = w.sum(dim=-1) / direction.sum(dim=-1, keepdim=True)  # (G, O/G)
    fitted = w - lam.unsqueeze(-1) * direction.unsqueeze(1)
    shift = torch.einsum("goi,gi->go", w - fitted, mu)
    return fitted.reshape(weight.shape), shift.reshape(-1)


def sampled_patches(
    x: Tensor, conv: nn.Conv2d, max_rows: int, generator: torch.Generator
) -> Tensor:
    """The input patches of ``conv`` on ``x`` as float64 rows ``(rows, C_in·kh·kw)`` in
    ``F.unfold``'s order: all of them, or ``max_rows`` positions drawn at random (``randperm``
    of every position with ``generator``), gathered without unfolding the rest (a 224² batch
    of 128 would unfold to gigabytes at a 3×3 conv)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    (ph, pw), (dh, dw) = conv.padding, conv.dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    total = n * oh * ow
    if total <= max_rows:
        cols = F.unfold(x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    pick = torch.randperm(total, generator=generator)[:max_rows].to(x.device)
    image, place = pick // (oh * ow), pick % (oh * ow)
    ys = (place // ow * sh)[:, None] + torch.arange(kh, device=x.device) * dh  # (rows, kh)
    xs = (place % ow * sw)[:, None] + torch.arange(kw, device=x.device) * dw  # (rows, kw)
    padded = F.pad(x, (pw, pw, ph, ph))
    channels = torch.arange(c, device=x.device)
    patches = padded[image[:, None, None, None], channels[None, :, None, None],
                     ys[:, None, :, None], xs[:, None, None, :]]  # fmt: skip
    return patches.reshape(max_rows, c * kh * kw).double()


@torch.no_grad()
def calibrate_nf(
    gm: fx.GraphModule,
    folded: dict[str, tuple[Tensor, Tensor]],
    example: Tensor,
    fit: str = "covariance",
    shrinkage: float = 0.1,
    max_rows: int = 4096,
) -> None:
    """Fit every WS conv of the NF mode to its folded conv on calibration data.

    One forward pass over ``example``; at each WS conv, in graph order, the input patches ``p``
    that the already-fitted network upstream delivers give the zero-mean kernel ``Ŵ`` closest
    to ``W_f`` (:func:`_zero_mean_fit`) and the bias ``b_f + (W_f − Ŵ)·E[p]`` that restores the
    expected output; the raw weight and gain are set so that WS yields exactly ``Ŵ``. At most
    ``max_rows`` patch positions (a fixed random subset) enter each covariance."""
    if fit not in ("mean", "covariance"):
        raise ValueError(f"fit must be 'mean' or 'covariance', got {fit!r}")
    handles = []
    gen = torch.Generator().manual_seed(0)
    for name, (weight, bias) in folded.items():
        module = gm.get_submodule(name)

        def hook(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor, w: Tensor = weight,
                 b: Tensor = bias) -> Tensor:  # fmt: skip
            x = args[0]
            rows = sampled_patches(x, mod, max_rows, gen)
            fitted, shift = _zero_mean_fit(w, rows, mod.groups, fit, shrinkage)
            norm = torch.linalg.vector_norm(fitted, dim=(1, 2, 3))
            safe = torch.where(norm > 0, norm, torch.ones_like(norm))
            mod.weight.copy_(_like(mod.weight, fitted / safe.reshape(-1, 1, 1, 1)))
            mod.gain.copy_(_like(mod.gain, norm))
            mod.bias.copy_(_like(mod.bias, b + shift))
            return F.conv2d(x, mod.standardized_weight(), mod.bias, mod.stride, mod.padding,
                            mod.dilation, mod.groups)  # fmt: skip

        handles.append(module.register_forward_hook(hook))
    try:
        gm(example)
    finally:
        for h in handles:
            h.remove()


def _scale_free(module: nn.Module) -> bool:
    """A module that commutes with a positive scale: identity, dropout, stochastic depth
    (a per-example 0/1 mask), or a sequence of them (the drop → act tail timm's
    ``BatchNormAct2d`` leaves where its activation is Identity)."""
    if isinstance(module, nn.Sequential):
        return all(_scale_free(m) for m in module)
    dropouts = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, FeatureDropout)  # (not alpha)
    if isinstance(module, (nn.Identity, *dropouts)):
        return True  # (timm's DropBlock2d with_noise fills dropped blocks with noise: not)
    return is_stochastic_depth(module) and getattr(module, "with_noise", False) is not True


def _through_identities(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The node that really produces ``node``'s value, past scale-free modules used once."""
    while node.op == "call_module" and _scale_free(gm.get_submodule(str(node.target))) \
            and isinstance(node.args[0], fx.Node) and len(node.args[0].users) == 1:  # fmt: skip
        node = node.args[0]
    return node


def add_residual_gains(gm: fx.GraphModule, mode: str, options: ConvertOptions) -> int:
    """Give every residual branch of ``gm`` a learnable scalar gain (init 1) and, in the NF mode,
    the fixed scale α when the branch ends in a WS conv (whose gain and bias are divided by α).
    Returns the number of residual branches. No-op in the GN modes (the norm handles scale)."""
    if mode not in ("bn_free", "nf"):
        return 0
    adds = find_residual_adds(gm)
    alpha = float(options.residual_alpha)
    like = next(gm.parameters(), None)
    for i, res in enumerate(adds):
        name = f"{_GAIN_PREFIX}{i}"
        gain_module = SkipInitGain(1.0)
        gm.add_submodule(name, _placed(gain_module, like) if like is not None else gain_module)
        with gm.graph.inserting_after(res.branch):
            gain = gm.graph.call_module(name, (res.branch,))
        res.node.replace_input_with(res.branch, gain)
        end = _through_identities(gm, res.branch)
        producer = gm.get_submodule(str(end.target)) if end.op == "call_module" else None
        if mode == "nf" and alpha != 1.0 and isinstance(producer, ScaledStdConv2d) \
                and len(end.users) == 1:  # fmt: skip
            with torch.no_grad():
                producer.gain.div_(alpha)
                producer.bias.div_(alpha)
            with gm.graph.inserting_after(gain):
                scaled = gm.graph.call_function(operator.mul, (gain, alpha))
            res.node.replace_input_with(gain, scaled)
    _finish(gm)
    return len(adds)


def mark_residual_outputs(gm: fx.GraphModule) -> list[str]:
    """Insert an ``nn.Identity`` named ``residual_out_{i}`` after every residual add (all modes):
    the residual stream's measurement points for ``normfree spp`` / ``diagnose``. Returns their
    names in graph order."""
    names = []
    for i, res in enumerate(find_residual_adds(gm)):
        name = f"{_OUT_PREFIX}{i}"
        gm.add_submodule(name, nn.Identity())
        with gm.graph.inserting_after(res.node):
            probe = gm.graph.call_module(name, (res.node,))
        res.node.replace_all_uses_with(probe, delete_user_cb=lambda user, p=probe: user is not p)
        names.append(name)
    _finish(gm)
    return names


def _finish(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
