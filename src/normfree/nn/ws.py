"""Weight-standardized convolutions.

* :func:`scaled_standardize` / :class:`ScaledStdConv2d` - Scaled Weight Standardization of
  NF-ResNets / NFNets (Brock et al. 2021a, eq. 2; 2021b; official ``base.WSConv2D``)::

      Ŵ = gain · γ · (W − μ) · rsqrt(max(N·σ², eps))

  with μ, σ² the mean and *biased* variance of each output filter over (in/groups, kh, kw),
  N = (in/groups)·kh·kw the fan-in, and ``eps = 1e-4`` a floor on N·σ² (not added to it).
* :func:`qiao_standardize` / :class:`WSConv2d` - Weight Standardization of Qiao et al. 2019
  (arXiv 1903.10520, eq. 5; used with GroupNorm): ``Ŵ = (W − μ) / (σ_unbiased + 1e-5)``.

Both modules share :class:`StdConv2dBase`: TF/JAX ``"SAME"`` padding (default), fp32
standardization under autocast / low-precision weights, an inference cache of the standardized
weight, and folding into a plain ``nn.Conv2d`` (:meth:`StdConv2dBase.to_conv2d`,
:func:`fold_weight_standardization`).
"""

from __future__ import annotations

import copy
import math
import re
from types import ModuleType
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normfree.nn import native
from normfree.nn.padding import Conv2dSame, _pad_same_2d, conv_pair, resolve_padding
from normfree.nn.pointwise_conv import (
    PointwiseConv2d,
    _PointwiseForms,
    pointwise_conv2d,
    strided_pointwise_conv2d,
)
from normfree.nn.unit_norms import (
    remember_grad_norms,
    remember_unit_stats,
    unit_norm_from_forward,
    unit_norms_from_forward,
    wants_grad_norms,
)

torch.fx.wrap("_pad_same_2d")  # torch.fx leaves: they branch on the input's size / device
torch.fx.wrap("strided_pointwise_conv2d")

__all__ = [
    "ScaledStdConv2d",
    "StdConv2dBase",
    "WSConv2d",
    "fold_weight_standardization",
    "qiao_standardize",
    "scaled_standardize",
    "unit_norm_from_forward",
    "unit_norms_from_forward",
]

def _reduce_dims(weight: Tensor) -> list[int]:
    if weight.dim() < 2:
        raise ValueError(
            f"weight must have >= 2 dims (out, in, ...), got shape {list(weight.shape)}"
        )
    return list(range(1, weight.dim()))


def _scaled_standardize_parts(
    weight: Tensor, gain: Tensor | None, eps: float, gamma: float, dims: list[int] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(Ŵ, W − μ, rsqrt(max(N·var, eps)), scale, N·var < eps)``; the single source of the
    formula. ``N·var`` of the biased variance is the sum of squared deviations, computed two-pass
    (mean first) as exactly as ``var_mean`` and several times faster on CPU. ``dims`` (the
    reduced dims) is given when ``weight`` is a ``torch.fx`` proxy, whose ``dim()`` is symbolic."""
    if dims is None:
        dims = _reduce_dims(weight)
    centered = weight - weight.mean(dim=dims, keepdim=True)
    n_var = torch.linalg.vector_norm(centered, dim=dims, keepdim=True).square()  # N·var
    rstd = torch.rsqrt(torch.clamp(n_var, min=eps))
    scale = rstd if gain is None else rstd * gain.reshape([-1] + [1] * len(dims))
    if gamma != 1.0:
        scale = scale * gamma
    return centered * scale, centered, rstd, scale, n_var < eps


def _analytic_backward(
    grad_out: Tensor, centered: Tensor, rstd: Tensor, scale: Tensor, floored: Tensor,
    gamma: float, needs_weight: bool, needs_gain: bool,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """Gradients of Scaled WS for weight and gain (see :class:`_ScaledStandardize`)."""
    dims = list(range(1, centered.dim()))
    dot = (grad_out * centered).sum(dim=dims, keepdim=True)  # Σ δ·c per unit
    grad_weight = grad_gain = None
    if needs_weight:
        mean_grad = grad_out.sum(dim=dims, keepdim=True) / centered[0].numel()
        grad_weight = torch.addcmul(-scale * mean_grad, grad_out, scale)
        coef = (-scale * rstd * rstd * dot).masked_fill(floored, 0.0)
        grad_weight.addcmul_(centered, coef)
    if needs_gain:
        grad_gain = (dot * rstd).reshape(-1) * gamma
    return grad_weight, grad_gain


class _ScaledStandardize(torch.autograd.Function):
    """Scaled WS with an analytic backward (fewer passes over the weight than autograd's).

    With c = W − μ, r = rsqrt(max(Σc², eps)), a = gain·γ·r and upstream gradient δ (per unit):
    ``∂L/∂W = a·(δ − mean(δ)) − a·r²·(Σδc)·c`` (the last term vanishes where the floor is
    active) and ``∂L/∂gain = γ·r·Σδc``. First-order only (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, gain: Tensor | None, eps: float, gamma: float) -> Tensor:
        out, centered, rstd, scale, floored = _scaled_standardize_parts(weight, gain, eps, gamma)
        ctx.save_for_backward(centered, rstd, scale, floored)
        ctx.gamma = gamma
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        centered, rstd, scale, floored = ctx.saved_tensors
        grad_weight, grad_gain = _analytic_backward(
            grad_out, centered, rstd, scale, floored, ctx.gamma, *ctx.needs_input_grad[:2]
        )
        return grad_weight, grad_gain, None, None


def _standardize_rows(
    weight: Tensor, gain: Tensor | None, eps: float, gamma: float
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(Ŵ, μ, rsqrt(var))`` of the formula of :func:`_scaled_standardize_parts`
    (``N·var = N / rsqrt(var)²``) in one fused kernel per pass, or ``None`` where the floor is
    active (a unit with ``N·var < eps``, e.g. a constant row, whose ``rsqrt(0)`` is inf).

    Scaled WS of a unit is group normalization of its fan-in row with one group per unit and no
    added epsilon: seen as a ``(1, out, N)`` input, ``native_group_norm`` with ``eps = 0`` and
    per-group affine weight ``gain·γ/√N`` gives ``gain·γ·(W − μ)·rsqrt(N·var)`` (its ``rstd`` is
    ``rsqrt(var)``), reading each row once into cache, ~2× faster on CPU than separate mean,
    centring, norm and scaling passes; autograd differentiates it with group norm's own fused
    backward (a C++ node: no Python runs in the backward, and double backward works)."""
    out_ch = weight.shape[0]
    fan_in = weight.numel() // out_ch
    factor = gamma / math.sqrt(fan_in)
    if gain is None:
        affine = weight.new_full((out_ch,), factor)
    else:  # in the weight's dtype, as the group-norm kernel needs (and the result has)
        affine = (gain * factor).to(weight.dtype)
    out, mean, inv_std = torch.ops.aten.native_group_norm(
        weight.reshape(1, out_ch, fan_in), affine, None, 1, out_ch, fan_in, out_ch, 0.0
    )
    # N·var < eps ⇔ rsqrt(var) > √(N/eps); NaN weights compare False and give NaN as before
    if eps > 0.0 and inv_std.max().item() > math.sqrt(fan_in / eps):
        return None
    return out.view(weight.shape), mean.detach().view(out_ch), inv_std.detach().view(out_ch)


def _standardize_rows_floored(
    weight: Tensor, gain: Tensor | None, eps: float, gamma: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Ŵ, μ, N·var)`` with the floor ``max(N·var, eps)``, without autograd: mean, centring,
    norm and scaling passes in place on one buffer."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    mean = rows.sum(1, keepdim=True).div_(rows.shape[1])  # mean(1)'s numbers, faster on CPU
    out = rows - mean
    n_var = torch.linalg.vector_norm(out, dim=1, keepdim=True).square_()
    scale = n_var.clamp_min(eps).rsqrt_()
    if gain is not None:
        scale = scale * gain.detach().reshape(-1, 1)
    if gamma != 1.0:
        scale = scale * gamma
    out.mul_(scale)
    return out.reshape(weight.shape), mean.reshape(-1), n_var.reshape(-1)


def _native_standardize(
    ext: ModuleType, weight: Tensor, gain: Tensor | None, eps: float, gamma: float
) -> tuple[Tensor, Tensor, Tensor, int | None]:
    """``(Ŵ, μ, N·var, forward number)`` from the native kernel (:mod:`normfree.nn.native`),
    keeping a parameter's statistics for AGC as :func:`_eager_standardize` does (the number
    is None for a tensor that is not a parameter)."""
    rows = weight.detach().reshape(weight.shape[0], -1).contiguous()
    g = None if gain is None else gain.detach().contiguous()
    out, mean, n_var = ext.scaled_ws_forward(rows, g, eps, gamma)
    number = None
    if isinstance(weight, nn.Parameter):
        number = remember_unit_stats(weight, mean, n_var=n_var)
    return out.view(weight.shape), mean, n_var, number


class _ScaledStandardizeNative(torch.autograd.Function):
    """Scaled WS for eager CPU through the native kernels of :mod:`normfree.nn.native`: the
    forward and the analytic backward of :class:`_ScaledStandardize` (floor included), one
    read of each weight row per pass. The backward of a parameter also keeps its gradient's
    per-unit norms for AGC (:func:`normfree.nn.unit_norms.unit_grad_norms_from_backward`).
    First-order only."""

    @staticmethod
    def forward(ctx, weight: Tensor, gain: Tensor | None, eps: float, gamma: float) -> Tensor:
        ext = native.extension()
        out, mean, n_var, ctx.forward_number = _native_standardize(ext, weight, gain, eps, gamma)
        ctx.save_for_backward(weight, gain, mean, n_var)
        ctx.ext, ctx.eps, ctx.gamma = ext, eps, gamma
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        weight, gain, mean, n_var = ctx.saved_tensors
        needs_weight, needs_gain = ctx.needs_input_grad[:2]
        rows = weight.reshape(weight.shape[0], -1).contiguous()
        want_norm = needs_weight and wants_grad_norms(weight, ctx.forward_number)
        grad_weight, grad_gain, grad_norm = ctx.ext.scaled_ws_backward(
            grad_out.reshape(rows.shape).contiguous(), rows, mean, n_var,
            None if gain is None else gain.contiguous(), ctx.eps, ctx.gamma,
            needs_weight, needs_gain and gain is not None, want_norm,
        )  # fmt: skip
        if needs_weight:
            grad_weight = grad_weight.view(weight.shape)
            remember_grad_norms(weight, grad_weight, grad_norm, ctx.forward_number)
        return (
            grad_weight if needs_weight else None,
            grad_gain if needs_gain and gain is not None else None,
            None,
            None,
        )


_NATIVE_DTYPES = (torch.float32, torch.float64)


def scaled_standardize(
    weight: Tensor, gain: Tensor | None = None, eps: float = 1e-4, gamma: float = 1.0
) -> Tensor:
    """Scaled WS (Brock et al. 2021a, eq. 2; official ``WSConv2D``), per output unit (dim 0):
    ``gain·γ·(W − μ)·rsqrt(max(N·var, eps))``, biased variance, ``N = W[0].numel()`` (fan-in),
    ``eps`` a floor on N·var (not added).

    ``gain`` has shape ``(out,)`` (``None`` means 1). Computed in ``weight``'s dtype. In eager
    mode on CPU it is group normalization with one group per unit (:func:`_standardize_rows`,
    train and eval alike): one fused kernel forward, group norm's fused backward through
    autograd (double backward works). Where a unit's N·var is below ``eps``, and under
    tracing / ``torch.compile`` / other devices, an analytic backward is used when a gradient
    is needed (first-order only; double backward raises). With the optional native
    kernels switched on (:mod:`normfree.nn.native`), eager CPU float32/float64 weights run
    the C++ forward and analytic backward instead (:class:`_ScaledStandardizeNative`).
    """
    if gain is not None and gain.shape != weight.shape[:1]:
        raise ValueError(f"gain must have shape ({weight.shape[0]},), got {list(gain.shape)}")
    if not torch.jit.is_scripting():
        tracing = torch.jit.is_tracing()
        needs_grad = weight.requires_grad or (gain is not None and gain.requires_grad)
        if not (tracing or torch.compiler.is_compiling()) and weight.device.type == "cpu":
            _reduce_dims(weight)  # a clear error for a weight without units
            ext = native.extension() if weight.dtype in _NATIVE_DTYPES else None
            if ext is not None and (gain is None or gain.dtype == weight.dtype):
                if needs_grad and torch.is_grad_enabled():
                    return _ScaledStandardizeNative.apply(weight, gain, eps, gamma)
                return _native_standardize(ext, weight, gain, eps, gamma)[0]
            return _eager_standardize(weight, gain, eps, gamma)
        if needs_grad and torch.is_grad_enabled() and not tracing:
            return _ScaledStandardize.apply(weight, gain, eps, gamma)
    return _scaled_standardize_parts(weight, gain, eps, gamma)[0]


@torch.jit.unused
def _eager_standardize(weight: Tensor, gain: Tensor | None, eps: float, gamma: float) -> Tensor:
    """Scaled WS in eager mode on CPU, train and eval alike: group normalization's fused
    forward and backward (:func:`_standardize_rows`); where the floor is active, the separate
    passes (:func:`_standardize_rows_floored`), or with autograd the analytic
    :class:`_ScaledStandardize`. A parameter's statistics are kept for AGC
    (:func:`unit_norms_from_forward`)."""
    if weight.numel() == 0:  # no unit to standardize, or units without a fan-in
        return _scaled_standardize_parts(weight, gain, eps, gamma)[0]
    fused = _standardize_rows(weight, gain, eps, gamma)
    if fused is not None:
        out, mean, inv_std = fused
        if isinstance(weight, nn.Parameter):
            remember_unit_stats(weight, mean, inv_std=inv_std)
        return out
    if torch.is_grad_enabled() and (
        weight.requires_grad or (gain is not None and gain.requires_grad)
    ):
        return _ScaledStandardize.apply(weight, gain, eps, gamma)
    out, mean, n_var = _standardize_rows_floored(weight, gain, eps, gamma)
    if isinstance(weight, nn.Parameter):
        remember_unit_stats(weight, mean, n_var=n_var)
    return out


def qiao_standardize(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Weight Standardization of Qiao et al. 2019 (eq. 5, official code): per output filter,
    ``(W − μ) / (σ + eps)`` with the *unbiased* (Bessel-corrected) standard deviation."""
    dims = _reduce_dims(weight)
    if weight[0].numel() < 2:
        raise ValueError("qiao_standardize needs >= 2 weights per output filter (unbiased std)")
    centered = weight - weight.mean(dim=dims, keepdim=True)
    std = torch.linalg.vector_norm(centered, dim=dims, keepdim=True) / math.sqrt(
        weight[0].numel() - 1
    )
    return centered / (std + eps)


def _upcast_half(weight: Tensor) -> Tensor:
    """fp16/bf16 → fp32; other dtypes unchanged."""
    if weight.dtype == torch.float16 or weight.dtype == torch.bfloat16:
        return weight.float()
    return weight


for _leaf in ("_upcast_half", "scaled_standardize", "qiao_standardize"):
    torch.fx.wrap(_leaf)


class StdConv2dBase(_PointwiseForms, nn.Conv2d):
    """Base of weight-standardized 2-D convs: ``conv(x, standardize(W)) + bias``.

    Subclasses override :meth:`standardize` (the formula, applied to an fp32/fp64 weight).

    * ``padding="same"`` (default) is TF/JAX ``"SAME"``: a static symmetric padding when that is
      equivalent (stride 1 with odd kernels, 1×1 kernels), otherwise a dynamic asymmetric pad
      (extra pixel after), as the official NFNet weights expect. ``"valid"``, an int or a pair
      behave as in ``nn.Conv2d``.
    * The standardization runs in fp32 when the weight is fp16/bf16 and ignores autocast; the
      result is cast back to the weight's dtype (autocast then casts it for the conv, as for a
      plain conv).
    * Inference cache: when no gradient can flow to the parameters (``torch.no_grad``,
      ``inference_mode`` or frozen parameters) the standardized weight is computed once and reused
      until a parameter changes. The key is the parameters' version counters and storage, so
      ``optimizer.step()``, ``load_state_dict`` and ``.to()`` invalidate it. The cache is not
      part of the state dict and is skipped under TorchScript, tracing and ``torch.compile``.
      Writes through ``param.data`` bypass version counters: call :meth:`clear_weight_cache`
      after them.
    * Folding: :meth:`to_conv2d` returns an equivalent plain conv (for export / deployment).
    """

    __jit_ignored_attributes__: ClassVar[list[str]] = ["_ws_cache"]
    _ws_cache: tuple | None = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = "same",
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups ({groups})"
            )
        kernel_size = conv_pair(kernel_size, "kernel_size")
        stride = conv_pair(stride, "stride")
        dilation = conv_pair(dilation, "dilation")
        static, dynamic = resolve_padding(padding, kernel_size, stride, dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, static, dilation, groups, bias,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.same_padding: bool = isinstance(padding, str) and padding.lower() == "same"
        self.dynamic_padding: bool = dynamic

    @property
    def fan_in(self) -> int:
        """N = (in/groups)·kh·kw."""
        return self.weight[0].numel()

    def reset_parameters(self) -> None:
        """Raw weight ~ N(0, 1/N) (fan-in normal, official ``VarianceScaling(1, fan_in, normal)``);
        bias 0."""
        nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(self.weight[0].numel()))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self._ws_cache = None

    def standardize(self, weight: Tensor) -> Tensor:
        """The standardization formula, applied to ``weight`` (fp32 or fp64). Override it."""
        raise NotImplementedError

    def standardized_weight(self) -> Tensor:
        """The effective conv weight (with autograd, no cache), in the weight's dtype."""
        weight = self.weight
        return self.standardize(_upcast_half(weight)).to(weight.dtype)

    def clear_weight_cache(self) -> None:
        """Drop the cached inference weight (it is rebuilt on the next no-grad forward)."""
        self._ws_cache = None

    @torch.jit.unused
    def _eager_weight(self) -> Tensor:
        weight, gain = self.weight, getattr(self, "gain", None)
        if isinstance(weight, torch.fx.Proxy):  # fx: trace the formula, never cache
            return self.standardized_weight()
        grad_wanted = torch.is_grad_enabled() and (
            weight.requires_grad or (gain is not None and gain.requires_grad)
        )
        if grad_wanted or torch.jit.is_tracing() or torch.compiler.is_compiling():
            if self._ws_cache is not None:
                self._ws_cache = None  # don't keep a stale copy alive while training
            return self.standardized_weight()
        key: tuple = (
            torch.is_inference_mode_enabled(),
            weight._version,
            weight.data_ptr(),
            weight.dtype,
            weight.device,
        )
        if gain is not None:
            key += (gain._version, gain.data_ptr(), gain.dtype)
        cache = self._ws_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            standardized = self.standardized_weight()
        # Holding detached views of the parameters keeps their storage alive, so a new parameter
        # tensor can never reuse the cached data pointer.
        pinned = (weight.detach(), None if gain is None else gain.detach())
        self._ws_cache = (key, standardized, pinned)
        return standardized

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            weight = self.standardized_weight()
        else:
            weight = self._eager_weight()
        return self._conv(x, weight, self.bias)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The convolution with "SAME" padding and the faster CPU forms of 1×1 convs
        (:mod:`normfree.nn.pointwise_conv`)."""
        if self.dynamic_padding:
            x = _pad_same_2d(x, self.kernel_size, self.stride, self.dilation)
        if self.strided_pointwise:
            return strided_pointwise_conv2d(x, weight, bias, self.stride, self.groups)
        if self.pointwise:
            return pointwise_conv2d(x, weight, bias)
        return self._conv_forward(x, weight, bias)

    def _apply(self, fn, recurse: bool = True):
        self._ws_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._ws_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_ws_cache"] = None
        return state

    def to_conv2d(
        self,
        weight_bias: tuple[Tensor, Tensor | None] | None = None,
        classes: tuple[type[nn.Conv2d], type[Conv2dSame]] = (nn.Conv2d, Conv2dSame),
    ) -> nn.Conv2d:
        """A plain conv with the standardized weight folded in (same outputs, same device/dtype).

        Returns ``nn.Conv2d`` when the padding is static (a 1×1 stride-1 conv as
        :class:`~normfree.nn.pointwise_conv.PointwiseConv2d`, an ``nn.Conv2d`` with faster CPU
        inference) and :class:`~normfree.nn.padding.Conv2dSame` (an ``nn.Conv2d`` subclass) when
        ``"SAME"`` needs a dynamic pad, or the two ``classes`` given instead; ``weight_bias``
        replaces the standardized weight and bias (e.g.
        :meth:`ScaledStdConv2d.effective_weight_bias` with a block's scales).
        """
        plain, same = classes
        ch = (self.in_channels, self.out_channels, self.kernel_size, self.stride)
        kwargs = {"device": self.weight.device, "dtype": self.weight.dtype}
        conv: nn.Conv2d
        if self.dynamic_padding:
            conv = same(*ch, self.dilation, self.groups, self.bias is not None, **kwargs)
        elif plain is nn.Conv2d and self.pointwise:
            conv = PointwiseConv2d(self.in_channels, self.out_channels, self.bias is not None,
                                   **kwargs)  # fmt: skip
        else:
            conv = plain(
                *ch, self.padding, self.dilation, self.groups, self.bias is not None, **kwargs
            )
        with torch.no_grad():
            weight, bias = weight_bias or (self.standardized_weight(), self.bias)
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.same_padding:
            text = re.sub(r", padding=\(\d+, \d+\)", "", text) + ", padding='same'"
        return text


class ScaledStdConv2d(StdConv2dBase):
    """Conv2d with Scaled Weight Standardization (Brock et al. 2021a, eq. 2; official
    ``base.WSConv2D``): ``Ŵ = gain·γ·(W − μ)·rsqrt(max(N·var, eps))`` per output channel.

    Args:
        padding: ``"same"`` (default, TF/JAX semantics as in the official NF models),
            ``"valid"``, an int or a pair.
        gain_init: initial value of the learnable per-channel ``gain`` (shape ``(out,)``).
        eps: floor on N·var (official 1e-4).
        gamma: fixed scale folded into the weight (e.g. an activation's γ; the official models
            keep γ in the activation and use 1).

    Raw weight ~ N(0, 1/N), bias 0, ``gain = gain_init`` (:meth:`reset_parameters`). Training
    differentiates through :func:`scaled_standardize` (on eager CPU group norm's backward).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = "same",
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        gain_init: float = 1.0,
        eps: float = 1e-4,
        gamma: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.gain_init = float(gain_init)
        self.eps = float(eps)
        self.gamma = float(gamma)
        self.gain = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fan-in normal weight, zero bias, ``gain = gain_init``."""
        super().reset_parameters()
        gain = getattr(self, "gain", None)  # absent while nn.Conv2d.__init__ runs
        if gain is not None:
            nn.init.constant_(gain, self.gain_init)

    def standardize(self, weight: Tensor) -> Tensor:
        return scaled_standardize(weight, self.gain.to(weight.dtype), self.eps, self.gamma)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_scaled(x)

    def forward_scaled(
        self,
        x: Tensor,
        in_scale: float = 1.0,
        out_scale: float = 1.0,
        out_gain: Tensor | None = None,
    ) -> Tensor:
        """``conv(in_scale·x, Ŵ)·s + bias·s`` with ``s = out_scale·out_gain`` (1 by default).

        The scales cost O(weights), not O(activations): they go into the standardized weight
        (``in_scale·s``) and the bias (``s``), which is exact because a convolution is linear.
        ``out_gain`` is a tensor broadcastable to ``(out,)`` (e.g. a 0-d SkipInit gain); its
        gradient is that of the plain form. Residual blocks use this to carry γ, 1/β, α and the
        skip gain in the weights (:class:`~normfree.nn.residual.NFResidualBlock`). It is a
        method, not ``forward`` arguments, so ``torch.fx`` traces ``forward`` with one input;
        module hooks do not see these calls.
        """
        if torch.jit.is_scripting():
            weight, bias = self.effective_weight_bias(in_scale, out_scale, out_gain)
        else:
            weight, bias = self._eager_weight_bias(in_scale, out_scale, out_gain)
        return self._conv(x, weight, bias)

    def effective_weight_bias(
        self, in_scale: float = 1.0, out_scale: float = 1.0, out_gain: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The conv weight and bias :meth:`forward` uses (with autograd, no cache)."""
        if in_scale == 1.0 and out_scale == 1.0 and out_gain is None:
            return self.standardized_weight(), self.bias
        weight = self.weight
        low = weight.dtype == torch.float16 or weight.dtype == torch.bfloat16
        work = weight.float() if low else weight
        gain = self.gain.to(work.dtype)
        if out_gain is not None:
            gain = gain * out_gain.to(work.dtype)
        w = scaled_standardize(work, gain, self.eps, self.gamma * in_scale * out_scale)
        return w.to(weight.dtype) if low else w, _scaled_bias(self.bias, out_scale, out_gain)

    @torch.jit.unused
    def _traced_weight_bias(
        self, in_scale: float, out_scale: float, out_gain: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """As :meth:`effective_weight_bias` while ``torch.fx`` traces (parameters are proxies:
        dtype and rank come from the real parameter, the formula is the plain one)."""
        real = dict(self.named_parameters(recurse=False))["weight"]  # fx proxies self.weight
        weight, gain = self.weight, self.gain
        low = real.dtype == torch.float16 or real.dtype == torch.bfloat16
        work = weight.float() if low else weight
        gain = gain.float() if low else gain
        if out_gain is not None:
            gain = gain * (out_gain.float() if low else out_gain)
        gamma = self.gamma * in_scale * out_scale
        w = _scaled_standardize_parts(work, gain, self.eps, gamma, _reduce_dims(real))[0]
        return w.to(real.dtype) if low else w, _scaled_bias(self.bias, out_scale, out_gain)

    @torch.jit.unused
    def _eager_weight_bias(
        self, in_scale: float, out_scale: float, out_gain: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(self.weight, torch.fx.Proxy):
            return self._traced_weight_bias(in_scale, out_scale, out_gain)
        weight, gain, bias = self.weight, self.gain, self.bias
        grad_wanted = torch.is_grad_enabled() and (
            weight.requires_grad
            or gain.requires_grad
            or (bias is not None and bias.requires_grad)
            or (out_gain is not None and out_gain.requires_grad)
        )
        if grad_wanted or torch.jit.is_tracing() or torch.compiler.is_compiling():
            if self._ws_cache is not None:
                self._ws_cache = None  # don't keep a stale copy alive while training
            return self.effective_weight_bias(in_scale, out_scale, out_gain)
        key: tuple = (
            torch.is_inference_mode_enabled(),
            in_scale,
            out_scale,
            weight._version,
            weight.data_ptr(),
            weight.dtype,
            weight.device,
            gain._version,
            gain.data_ptr(),
            gain.dtype,
        )
        tensors = [weight, gain]
        for extra in (bias, out_gain):
            if extra is not None:
                key += (extra._version, extra.data_ptr(), extra.dtype)
                tensors.append(extra)
            else:
                key += (None,)
        cache = self._ws_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            value = self.effective_weight_bias(in_scale, out_scale, out_gain)
        # Holding detached views of the tensors keeps their storage alive, so a new tensor can
        # never reuse a cached data pointer.
        self._ws_cache = (key, value, [t.detach() for t in tensors])
        return value

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", eps={self.eps:g}"
        return text + f", gamma={self.gamma:g}" if self.gamma != 1.0 else text


def _scaled_bias(bias: Tensor | None, out_scale: float, out_gain: Tensor | None) -> Tensor | None:
    if bias is None:
        return bias
    if out_gain is not None:
        return bias * (out_gain.to(bias.dtype) * out_scale)
    if out_scale != 1.0:
        return bias * out_scale
    return bias


class WSConv2d(StdConv2dBase):
    """Conv2d with the Weight Standardization of Qiao et al. 2019 (arXiv 1903.10520, eq. 5):
    ``Ŵ = (W − μ) / (σ_unbiased + eps)`` per output filter; no gain, no fan-in scaling. Meant
    to be followed by GroupNorm (the WS+GN baseline). ``padding`` as in :class:`StdConv2dBase`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = "same",
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            device=device, dtype=dtype,
        )  # fmt: skip
        if self.fan_in < 2:
            raise ValueError(
                "WSConv2d needs a fan-in (in_channels/groups·kh·kw) >= 2 for the unbiased std, "
                f"got {self.fan_in}"
            )
        self.eps = float(eps)

    def standardize(self, weight: Tensor) -> Tensor:
        return qiao_standardize(weight, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps:g}"


def fold_weight_standardization(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every :class:`StdConv2dBase` in ``model`` by its folded plain conv
    (:meth:`StdConv2dBase.to_conv2d`), for export and inference. Works on a deep copy unless
    ``inplace``; a bare WS conv is returned folded."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, StdConv2dBase):
        return model.to_conv2d()
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, StdConv2dBase):
                setattr(parent, name, child.to_conv2d())
    return model
