"""Proxy Normalization (Labatie, Masters, Eaton-Rosen, Luschi 2021, arXiv 2106.03743).

A proxy-normalized activation replaces "affine + activation" after a norm layer without affine
(LayerNorm or GroupNorm), per channel ``c``::

    PN-Act(y)_c = (φ(γ_c·y + β_c) − E[φ(γ_c·Y_c + β_c)]) / sqrt(Var[φ(γ_c·Y_c + β_c)] + ε)
    Y_c ~ N(β̃_c, (1 + γ̃_c)²)                                   (Labatie et al. 2021, §4)

The expectations are taken deterministically over ``N = 200`` fixed midpoint quantiles of N(0,1),
``u_i = √2·erfinv(2(i + 0.5)/N − 1)``, as in Graphcore's reference code: ``Y_c = (1+γ̃_c)·u + β̃_c``
and the mean and *population* variance run over the N points, in float32 (float64 for float64
parameters). ε = 0.03. The statistics are computed in ``forward`` with autograd, so gradients
flow through them into γ, β, γ̃ and β̃ (Graphcore back-propagates into them by hand; same maths).

It is computed in few passes. φ's argument at the proxy points, ``γ·((1+γ̃)·u + β̃) + β``, is
one affine map of ``u`` (one ``torch.addcmul``). ReLU is positively homogeneous, so for the output
scale ``a > 0``, ``a·relu(γ·y + β) + b = relu(aγ·y + aβ) + b``: three passes over the
activation instead of five. A group norm without affine followed by a PN-Act
(:func:`norm_then_act`, in :class:`NormAct` and the pre-activation blocks) carries PN's
``(γ, β)`` in its own kernel, with ReLU ``(aγ, aβ)``, then an in-place ReLU and the shift. On
CPU a train step of lnpn_resnet50 (b8 @128²) takes ≈ 0.83× the time of the literal form
(docs/benchmarks.md, "Twenty-first pass").

Parameters per channel: ``weight`` (γ, init 1), ``bias`` (β, init 0), ``proxy_weight`` (γ̃,
init 0), ``proxy_bias`` (β̃, init 0). The paper puts **weight decay on γ̃ and β̃** (it keeps the
proxy close to N(0,1)) and none on γ and β: :func:`proxy_norm_decay_names` and
:func:`proxy_norm_no_decay_names` declare them for the optimizer's parameter groups.

At inference the statistics are constants: :meth:`ProxyNormActivation.folded` (and
:func:`fold_proxy_norm` for a whole model) gives ``a_c·φ(γ_c·y + β_c) + b_c``.

:class:`NormAct` is the drop-in block "norm → (proxy-normalized) activation": GroupNorm, LayerNorm
over (C, H, W) (= GroupNorm with one group), BatchNorm or no norm, followed either by PN-Act
(``proxy=True``; the norm then has no affine) or by the plain activation (``proxy=False``; the norm
keeps its affine), so that GN+PN, LN+PN, GN and LN are one class.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normfree.nn.activations import get_activation
from normfree.nn.eager_forms import is_fx_proxy
from normfree.nn.norm import norm_layer

__all__ = [
    "FoldedProxyNormActivation",
    "NormAct",
    "ProxyNormActivation",
    "fold_proxy_norm",
    "midpoint_normal_quantiles",
    "norm_then_act",
    "proxy_norm_decay_names",
    "proxy_norm_no_decay_names",
]

ActivationSpec = str | nn.Module | Callable[[Tensor], Tensor]
# Registered activations that are not elementwise (they mix channels) cannot be proxy-normalized.
_NOT_ELEMENTWISE = frozenset({"glu", "log_softmax"})


def midpoint_normal_quantiles(
    num_quantiles: int = 200,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The N midpoint quantiles of N(0,1): ``u_i = √2·erfinv(2(i+0.5)/N − 1)``, i = 0…N−1.

    Computed in float64, then cast. For N = 200 they span ±2.8070 with population variance
    0.993596 (slightly below 1: the tails beyond the outermost midpoints are cut off)."""
    if isinstance(num_quantiles, bool) or not isinstance(num_quantiles, int):
        raise TypeError(f"num_quantiles must be an int, got {type(num_quantiles).__name__}")
    if num_quantiles < 2:
        raise ValueError(f"num_quantiles must be >= 2, got {num_quantiles}")
    i = torch.arange(num_quantiles, dtype=torch.float64)
    u = math.sqrt(2.0) * torch.erfinv(2.0 * (i + 0.5) / num_quantiles - 1.0)
    return u.to(device=device, dtype=dtype)


class _CallableActivation(nn.Module):
    """Wraps a plain elementwise callable so that it can live in a module tree."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def _build_activation(activation: ActivationSpec) -> nn.Module:
    if isinstance(activation, str):
        if activation.lower() in _NOT_ELEMENTWISE:
            raise ValueError(
                f"activation {activation!r} is not elementwise and cannot be proxy-normalized"
            )
        return get_activation(activation, inplace=False)
    if isinstance(activation, nn.Module):
        return activation
    if callable(activation):
        return _CallableActivation(activation)
    raise TypeError(
        "activation must be a name, an nn.Module or an elementwise callable, "
        f"got {type(activation).__name__}"
    )


def _on_channels(t: Tensor, like: Tensor) -> Tensor:
    """A per-channel ``(C,)`` tensor in ``like``'s dtype, shaped to broadcast on its axis 1."""
    return t.to(like.dtype).reshape((1, -1) + (1,) * (like.ndim - 2))


def _channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x·scale_c + shift_c`` with per-channel ``(C,)`` tensors on axis 1, in ``x``'s dtype (the
    shift added in place to the product, which autograd does not keep: one tensor, not two)."""
    return (x * _on_channels(scale, x)).add_(_on_channels(shift, x))


def _relu_then_shift(y: Tensor, shift: Tensor) -> Tensor:
    """``relu(y) + shift_c`` for PN-Act's ReLU form (``y`` already carries ``aγ, aβ``; the ReLU
    in place on it)."""
    return y.relu_() + _on_channels(shift, y)


def _check_input(x: Tensor, num_channels: int, who: str) -> None:
    if x.ndim < 2 or x.shape[1] != num_channels:
        raise ValueError(
            f"{who} expects input (N, {num_channels}, ...) with channels on axis 1, "
            f"got shape {list(x.shape)}"
        )


def _check_elementwise(proxy: Tensor, z: Tensor) -> None:
    if z.shape != proxy.shape:
        raise ValueError(
            f"the activation must be elementwise: it mapped shape {list(proxy.shape)} "
            f"to {list(z.shape)}"
        )


for _leaf in ("_check_input", "_check_elementwise"):
    torch.fx.wrap(_leaf)  # leaves of torch.fx traces: they read shapes


def _moments_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of the proxy statistics: float32, float64 for float64 parameters."""
    return torch.promote_types(weight.dtype, torch.float32)


# one call in a torch.fx graph: before torch 2.6, promote_types cannot take a traced dtype
torch.fx.wrap("_moments_dtype")


class ProxyNormActivation(nn.Module):
    """Proxy-normalized activation PN-Act (Labatie et al. 2021, §4; see the module docstring).

    Args:
        num_channels: C; the channel axis is 1 (``(N, C, H, W)``, ``(N, C)``, ``(N, C, L)``…).
        activation: a name of :func:`normfree.nn.get_activation` (``"relu"``, ``"silu"``,
            ``"gelu"`` = tanh approximation, ``"gelu_exact"``…), an ``nn.Module`` or a callable;
            it must be elementwise (it is applied to the (C, N) proxy points as well).
        eps: ε added to the proxy variance (0.03 in the paper's code).
        num_quantiles: N, the number of midpoint quantiles of the proxy (200).
        scale: ``False`` keeps only the proxy centering, ``φ(γ·y + β) − E[φ(γ·Y + β)]``: the
            network "Top" of Labatie et al. 2021 (the last activation before global pooling,
            whose scale the classifier absorbs; Graphcore's ``efficientnet.py``).
    """

    def __init__(
        self,
        num_channels: int,
        activation: ActivationSpec = "relu",
        eps: float = 0.03,
        num_quantiles: int = 200,
        scale: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int):
            raise TypeError(f"num_channels must be an int, got {type(num_channels).__name__}")
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        eps = float(eps)
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"eps must be a non-negative finite number, got {eps}")
        self.num_channels = num_channels
        self.eps = eps
        self.num_quantiles = num_quantiles
        self.scale = bool(scale)
        self.act = _build_activation(activation)
        self.register_buffer(
            "quantiles", midpoint_normal_quantiles(num_quantiles), persistent=False
        )
        self._find_form()
        self.weight = nn.Parameter(torch.empty(num_channels))
        self.bias = nn.Parameter(torch.empty(num_channels))
        self.proxy_weight = nn.Parameter(torch.empty(num_channels))
        self.proxy_bias = nn.Parameter(torch.empty(num_channels))
        self.reset_parameters()

    def _find_form(self) -> None:
        # ReLU moves through the output scale a = rsqrt(Var + ε) when a is finite and positive
        # (ε > 0, or no scale: a = 1); an exact nn.ReLU, not a subclass that may change it
        self.relu_form = type(self.act) is nn.ReLU and (self.eps > 0.0 or not self.scale)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        # an activation, ε or scale changed after construction (model surgery) finds the form
        # again; during construction _find_form runs once at the end
        if name in ("act", "eps", "scale") and "relu_form" in self.__dict__:
            self._find_form()

    def __setstate__(self, state: dict) -> None:  # modules pickled before this attribute
        super().__setstate__(state)
        if "relu_form" not in state:
            self._find_form()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.proxy_weight.zero_()
            self.proxy_bias.zero_()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Every conversion recomputes the quadrature nodes: float64 nodes at full precision for
        # float64 modules, float32 (never half precision) otherwise. Also when the dtype stays:
        # ``to_empty`` (meta-device initialisation) leaves uninitialised memory, which neither
        # ``reset_parameters`` nor ``load_state_dict`` (the buffer is not persistent) restores.
        super()._apply(fn, recurse)
        dtype = torch.float64 if self.quantiles.dtype == torch.float64 else torch.float32
        q = midpoint_normal_quantiles(self.num_quantiles, dtype, self.quantiles.device)
        if self.quantiles.dtype == dtype and self.quantiles.is_shared():
            with torch.no_grad():  # in place: keeps shared memory (``share_memory``)
                self.quantiles.copy_(q)
        else:  # a new tensor (an inference-mode buffer cannot be written in place outside it)
            self.register_buffer("quantiles", q, persistent=False)
        return self

    def proxy_moments(self) -> tuple[Tensor, Tensor]:
        """``(E, Var)`` of ``φ(γ·Y + β)`` per channel over the N proxy points, shape ``(C,)``,
        in float32 (float64 when the parameters are float64); differentiable."""
        dtype = _moments_dtype(self.weight)
        u = self.quantiles.to(dtype)
        gamma = self.weight.to(dtype)
        # φ's argument γ·((1 + γ̃)·u + β̃) + β at the N points: one affine map of u per channel
        slope = gamma * (1.0 + self.proxy_weight.to(dtype))
        offset = torch.addcmul(self.bias.to(dtype), gamma, self.proxy_bias.to(dtype))
        # (no matrix-product op such as addr or vecdot: autocast would run those in half
        # precision)
        points = torch.addcmul(offset[:, None], slope[:, None], u)
        z = self.act(points)
        _check_elementwise(points, z)
        mean = z.mean(dim=1)
        var = torch.linalg.vector_norm(z - mean[:, None], dim=1).square() / z.shape[1]
        return mean, var

    def folded_affine(self) -> tuple[Tensor, Tensor]:
        """``(a, b)`` with ``PN-Act(y) = a·φ(γ·y + β) + b``: ``a = (Var + ε)^(-1/2)`` and
        ``b = −a·E``, shape ``(C,)`` (``a = 1`` when ``scale=False``)."""
        mean, var = self.proxy_moments()
        scale = torch.rsqrt(var + self.eps) if self.scale else torch.ones_like(mean)
        return scale, -scale * mean

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_channels, "ProxyNormActivation")
        scale, shift = self.folded_affine()
        if self.relu_form:  # a·relu(γ·x + β) + b = relu(aγ·x + aβ) + b, a > 0
            inner = _channel_affine(x, scale * self.weight, scale * self.bias)
            return _relu_then_shift(inner, shift)
        z = self.act(_channel_affine(x, self.weight, self.bias))
        return _channel_affine(z, scale, shift)

    @torch.no_grad()
    def folded(self) -> FoldedProxyNormActivation:
        """The inference form ``a_c·φ(γ_c·y + β_c) + b_c`` with the current parameters (a new
        module with a copy of the activation; the statistics are frozen)."""
        scale, shift = self.folded_affine()
        folded = FoldedProxyNormActivation(self.num_channels, copy.deepcopy(self.act))
        dtype = self.weight.dtype
        folded.to(device=self.weight.device, dtype=dtype)
        folded.weight.copy_(self.weight)
        folded.bias.copy_(self.bias)
        folded.out_scale.copy_(scale.to(dtype))
        folded.out_bias.copy_(shift.to(dtype))
        return folded

    def extra_repr(self) -> str:
        extra = "" if self.scale else ", scale=False"
        return f"{self.num_channels}, eps={self.eps:g}, num_quantiles={self.num_quantiles}{extra}"


class FoldedProxyNormActivation(nn.Module):
    """Inference form of PN-Act: ``out_scale_c·φ(weight_c·y + bias_c) + out_bias_c``.

    All four per-channel tensors are (persistent) buffers: the module holds frozen statistics
    and is meant for evaluation and export. Build it with :meth:`ProxyNormActivation.folded`.
    """

    def __init__(self, num_channels: int, activation: ActivationSpec = "relu") -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        self.num_channels = num_channels
        self.act = _build_activation(activation)
        self.register_buffer("weight", torch.ones(num_channels))
        self.register_buffer("bias", torch.zeros(num_channels))
        self.register_buffer("out_scale", torch.ones(num_channels))
        self.register_buffer("out_bias", torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_channels, "FoldedProxyNormActivation")
        z = self.act(_channel_affine(x, self.weight, self.bias))
        return _channel_affine(z, self.out_scale, self.out_bias)

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


def norm_then_act(norm: nn.Module, act: nn.Module, x: Tensor) -> Tensor:
    """``act(norm(x))``. Where ``norm`` is an ``nn.GroupNorm`` without affine (the LayerNorm
    over (C, H, W) of :class:`NormAct` is one with a single group) and ``act`` a PN-Act, the
    group norm's kernel carries PN's affine: ``a·φ(GN(x; γ, β)) + b``, and with ReLU
    (:attr:`ProxyNormActivation.relu_form`) ``relu(GN(x; aγ, aβ)) + b``. That is one or two
    passes over the activation fewer, forward and backward, for the same function and
    gradients (module docstring). The modules' own
    ``forward`` and hooks are then not called: blocks that use this have a ``fold_scales`` flag,
    and :func:`normfree.nn.plain_forward` switches it off. A ``torch.fx`` trace records the two
    modules."""
    if (
        type(norm) is nn.GroupNorm
        and not norm.affine
        and isinstance(act, ProxyNormActivation)
        and not is_fx_proxy(x)
    ):
        _check_input(x, act.num_channels, "ProxyNormActivation")
        scale, shift = act.folded_affine()
        if not act.relu_form:  # φ(GN(x; γ, β))·a + b
            y = F.group_norm(x, norm.num_groups, act.weight.to(x.dtype), act.bias.to(x.dtype),
                             norm.eps)  # fmt: skip
            return _channel_affine(act.act(y), scale, shift)
        y = F.group_norm(
            x, norm.num_groups, (scale * act.weight).to(x.dtype), (scale * act.bias).to(x.dtype),
            norm.eps,
        )  # fmt: skip
        return _relu_then_shift(y, shift)
    return act(norm(x))


def fold_proxy_norm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every :class:`ProxyNormActivation` in ``model`` by its folded inference form.
    Works on a deep copy unless ``inplace``; a bare PN-Act is returned folded."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, ProxyNormActivation):
        return model.folded()
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ProxyNormActivation):
                setattr(parent, name, child.folded())
    return model


def _pn_param_names(model: nn.Module, attrs: tuple[str, ...]) -> set[str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, ProxyNormActivation):
            names.update(f"{prefix}.{a}" if prefix else a for a in attrs)
    return names


def proxy_norm_decay_names(model: nn.Module) -> set[str]:
    """Qualified names of every PN ``proxy_weight`` (γ̃) and ``proxy_bias`` (β̃) in ``model``:
    the paper applies weight decay to them (it pulls the proxy towards N(0,1)).

    Normfree models treat every ``ndim ≤ 1`` tensor as no-decay by default, so a model using
    PN declares ``no_weight_decay_names() = super().no_weight_decay_names() -
    proxy_norm_decay_names(self)``."""
    return _pn_param_names(model, ("proxy_weight", "proxy_bias"))


def proxy_norm_no_decay_names(model: nn.Module) -> set[str]:
    """Qualified names of every PN ``weight`` (γ) and ``bias`` (β) in ``model``: no weight
    decay (the affine a norm layer would otherwise carry)."""
    return _pn_param_names(model, ("weight", "bias"))


NormKind = Literal["gn", "ln", "bn", "none"]


class NormAct(nn.Module):
    """``norm → activation`` block; with ``proxy=True`` the activation is PN-Act.

    * ``norm="gn"``: GroupNorm with ``num_groups`` groups; ``"ln"``: LayerNorm over (C, H, W),
      i.e. GroupNorm with one group (per-example statistics over all channels and positions, the
      paper's LN for convnets); ``"bn"``: BatchNorm2d (a batch-dependent baseline); ``"none"``.
    * ``proxy=True``: the norm has **no affine** and is followed by :class:`ProxyNormActivation`
      (GN+PN, LN+PN of Labatie et al. 2021). ``proxy=False``: the norm keeps its affine and is
      followed by the plain activation (the GN / LN baselines).
    * ``activation=None``: no activation (a norm not followed by one, e.g. an MBConv projection);
      then ``proxy`` must be False and the norm keeps its affine.

    Submodules are ``norm`` and ``act``; parameter names are therefore ``norm.weight``,
    ``act.proxy_weight`` etc. A group norm followed by PN-Act carries PN's affine in its kernel
    (:func:`norm_then_act`, which skips the two modules' hooks) while ``fold_scales`` is True,
    the default; :func:`normfree.nn.plain_forward` switches it off.
    """

    def __init__(
        self,
        num_channels: int,
        norm: NormKind = "gn",
        proxy: bool = True,
        activation: ActivationSpec | None = "relu",
        num_groups: int = 32,
        eps_norm: float = 1e-3,
        eps_proxy: float = 0.03,
        num_quantiles: int = 200,
    ) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        if activation is None and proxy:
            raise ValueError("proxy=True needs an activation; activation=None has nothing to proxy")
        eps_norm = float(eps_norm)
        if not (math.isfinite(eps_norm) and eps_norm > 0.0):
            raise ValueError(f"eps_norm must be a positive finite number, got {eps_norm}")
        affine = not proxy
        self.norm_kind = norm
        self.proxy = bool(proxy)
        if norm == "gn":
            if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
                raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
            if num_channels % num_groups:
                raise ValueError(
                    f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
                )
        if norm in ("gn", "ln", "bn"):
            self.norm: nn.Module = norm_layer(norm, num_channels, eps_norm, affine, num_groups)
        elif norm == "none":
            self.norm = nn.Identity()
        else:
            raise ValueError(f"norm must be 'gn', 'ln', 'bn' or 'none', got {norm!r}")
        if activation is None:
            self.act: nn.Module = nn.Identity()
        elif proxy:
            self.act = ProxyNormActivation(num_channels, activation, eps_proxy, num_quantiles)
        else:
            self.act = _build_activation(activation)
        self.fold_scales = True  # PN's affine in the group norm's kernel (norm_then_act)

    def forward(self, x: Tensor) -> Tensor:
        if self.fold_scales and not torch.jit.is_scripting():
            return self._forward_folded(x)
        return self.act(self.norm(x))

    @torch.jit.unused
    def _forward_folded(self, x: Tensor) -> Tensor:
        return norm_then_act(self.norm, self.act, x)

    def __setstate__(self, state: dict) -> None:  # blocks pickled before the flag
        super().__setstate__(state)
        self.__dict__.setdefault("fold_scales", True)

    def extra_repr(self) -> str:
        return f"norm={self.norm_kind!r}, proxy={self.proxy}"
