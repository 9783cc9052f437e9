"""The Scaled-WS and WS formulas as functions, and the forms they run in.

* :func:`scaled_standardize` - Scaled Weight Standardization (Brock et al. 2021a, eq. 2;
  official ``WSConv2D``)::

      Ŵ = gain · γ · (W − μ) · rsqrt(max(N·σ², eps))

  per output unit, biased variance, N the fan-in, ``eps`` a floor on N·σ² (not added). Its
  forms: in eager mode on CPU, group normalization with one group per unit
  (:func:`_standardize_rows`: one fused kernel forward, group norm's own backward); with the
  opt-in native kernels, C++ (:class:`_ScaledStandardizeNative`); under tracing,
  ``torch.compile`` and on other devices, and where a unit's N·σ² is below the floor, the
  formula with an analytic backward (:class:`_ScaledStandardize`).
* :func:`qiao_standardize` - Weight Standardization of Qiao et al. 2019 (eq. 5).

The modules using them are in :mod:`normfree.nn.ws`.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor, nn

from normfree.nn import native
from normfree.nn.eager_forms import has_tangent, under_functorch, untransformed
from normfree.nn.param_updates import backward_update
from normfree.nn.unit_norms import (
    remember_grad_norms,
    remember_unit_stats,
    wants_grad_norms,
)

__all__ = ["qiao_standardize", "scaled_standardize"]


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


def _differentiable_backward(
    grad_out: Tensor, weight: Tensor, gain: Tensor | None, eps: float, gamma: float,
    needs_weight: bool, needs_gain: bool,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """The gradients of :func:`_analytic_backward` for a backward with ``create_graph=True``
    (a gradient penalty over the weights, a Hessian-vector product): the formula recomputed
    from the Function's inputs, so the gradients are differentiable ops of ``weight``,
    ``gain`` and ``grad_out`` and autograd takes their derivatives. The Functions' fast
    backwards read statistics saved without a graph; under ``once_differentiable`` a
    ``torch.autograd.grad`` over the weights got no second derivative (None, or "not used in
    the graph") instead of an error."""
    _, centered, rstd, scale, floored = _scaled_standardize_parts(weight, gain, eps, gamma)
    grad_out = grad_out.to(centered.dtype)  # a bfloat16 Ŵ's gradient (native ``bf16_out``)
    return _analytic_backward(
        grad_out, centered, rstd, scale, floored, gamma, needs_weight, needs_gain
    )


class _ScaledStandardize(torch.autograd.Function):
    """Scaled WS with an analytic backward (fewer passes over the weight than autograd's).

    With c = W − μ, r = rsqrt(max(Σc², eps)), a = gain·γ·r and upstream gradient δ (per unit):
    ``∂L/∂W = a·(δ − mean(δ)) − a·r²·(Σδc)·c`` (the last term vanishes where the floor is
    active) and ``∂L/∂gain = γ·r·Σδc``. A backward with ``create_graph=True`` recomputes
    the formula (:func:`_differentiable_backward`), so double backward works.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, gain: Tensor | None, eps: float, gamma: float) -> Tensor:
        out, centered, rstd, scale, floored = _scaled_standardize_parts(weight, gain, eps, gamma)
        ctx.save_for_backward(weight, gain, centered, rstd, scale, floored)
        ctx.eps, ctx.gamma = eps, gamma
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        weight, gain, centered, rstd, scale, floored = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return *_differentiable_backward(
                grad_out, weight, gain, ctx.eps, ctx.gamma, *ctx.needs_input_grad[:2]
            ), None, None  # fmt: skip
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
    out, mean, inv_std = torch.ops.aten.native_group_norm(  # torch 2.11 needs contiguous rows
        weight.reshape(1, out_ch, fan_in).contiguous(), affine, None, 1, out_ch, fan_in, out_ch,
        0.0,
    )  # fmt: skip
    # N·var < eps ⇔ rsqrt(var) > √(N/eps). The max is one cheap read; where it is NaN (a NaN
    # unit) every unit is compared, so a NaN unit does not hide a floored one
    if eps > 0.0:
        limit = math.sqrt(fan_in / eps)
        largest = inv_std.max().item()
        if largest > limit or (largest != largest and bool((inv_std > limit).any())):
            return None
    return out.view(weight.shape), mean.view(out_ch), inv_std.view(out_ch)


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
    ext: ModuleType,
    weight: Tensor,
    gain: Tensor | None,
    eps: float,
    gamma: float,
    bf16_out: bool = False,
) -> tuple[Tensor, Tensor, Tensor, int | None]:
    """``(Ŵ, μ, N·var, forward number)`` from the native kernel (:mod:`normfree.nn.native`),
    keeping a parameter's statistics for AGC as :func:`_eager_standardize` does (the number
    is None for a tensor that is not a parameter); ``bf16_out``: Ŵ of a float32 weight
    written as bfloat16 (the bits of ``Ŵ.to(torch.bfloat16)``, NaN payloads aside), the
    statistics in float32."""
    rows = weight.detach().reshape(weight.shape[0], -1).contiguous()
    g = None if gain is None else gain.detach().contiguous()
    out, mean, n_var = ext.scaled_ws_forward(rows, g, eps, gamma, bf16_out)
    number = None
    if isinstance(weight, nn.Parameter):
        number = remember_unit_stats(weight, mean, n_var=n_var)
    return out.view(weight.shape), mean, n_var, number


class _ScaledStandardizeNative(torch.autograd.Function):
    """Scaled WS for eager CPU through the native kernels of :mod:`normfree.nn.native`: the
    forward and the analytic backward of :class:`_ScaledStandardize` (floor included), one
    read of each weight row per pass. The backward of a parameter also keeps its gradient's
    per-unit norms for AGC (:func:`normfree.nn.unit_norms.unit_grad_norms_from_backward`), or,
    where an optimizer step is registered for the weight
    (:func:`normfree.nn.param_updates.set_backward_update`), applies that step to the weight's
    rows instead of writing its gradient. With ``bf16_out`` a float32 weight's Ŵ comes out as
    bfloat16 (:func:`scaled_standardize`'s ``out_dtype``), and the backward reads the bfloat16
    gradient as it comes. A backward with ``create_graph=True`` recomputes the formula
    instead (:func:`_differentiable_backward`: double backward works; no backward update or
    gradient norms then)."""

    @staticmethod
    def forward(
        ctx,
        weight: Tensor,
        gain: Tensor | None,
        eps: float,
        gamma: float,
        bf16_out: bool = False,
    ) -> Tensor:
        ext = native.extension("scaled_ws")
        out, mean, n_var, ctx.forward_number = _native_standardize(
            ext, weight, gain, eps, gamma, bf16_out
        )
        ctx.save_for_backward(weight, gain, mean, n_var)
        ctx.ext, ctx.eps, ctx.gamma = ext, eps, gamma
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        weight, gain, mean, n_var = ctx.saved_tensors
        needs_weight, needs_gain = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True
            return *_differentiable_backward(
                grad_out, weight, gain, ctx.eps, ctx.gamma, needs_weight, needs_gain
            ), None, None, None  # fmt: skip
        rows = weight.reshape(weight.shape[0], -1).contiguous()
        grad_rows = grad_out.reshape(rows.shape).contiguous()
        update = backward_update(weight) if needs_weight else None
        if update is not None:  # an optimizer step applied here (normfree.optim.backward_update)
            need_gain = needs_gain and gain is not None
            applied, grad_gain = update(
                grad_rows, rows, mean, n_var, None if gain is None else gain.contiguous(),
                ctx.eps, ctx.gamma, need_gain,
            )  # fmt: skip
            if applied:
                return None, grad_gain if need_gain else None, None, None, None
        want_norm = needs_weight and wants_grad_norms(weight, ctx.forward_number)
        grad_weight, grad_gain, grad_norm = ctx.ext.scaled_ws_backward(
            grad_rows, rows, mean, n_var,
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
            None,
        )


def _device_parts(
    weight: Tensor, gain: Tensor | None, eps: float, gamma: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(Ŵ, μ, var, rsqrt(max(var, eps/N)), gain·γ/√N)`` of :func:`scaled_standardize`'s
    formula without a host read: one ``var_mean`` reduction, and batch normalization's
    inference kernel on the ``(1, out, N)`` rows with the floored variance as its running
    variance, ``(W − μ)/√max(var, eps/N) · gain·γ/√N``, which is ``gain·γ·(W − μ)·
    rsqrt(max(N·var, eps))``. The floor is applied on the device: no kernel waits for the
    host."""
    out_ch = weight.shape[0]
    fan_in = weight.numel() // out_ch
    rows = weight.reshape(1, out_ch, fan_in)
    var, mean = torch.var_mean(rows[0], dim=1, correction=0)
    factor = gamma / math.sqrt(fan_in)
    affine = weight.new_full((out_ch,), factor) if gain is None else gain * factor
    floored_var = var.clamp_min(eps / fan_in)
    out = torch.ops.aten.native_batch_norm(rows, affine, None, mean, floored_var, False, 0.0, 0.0)
    return out[0].view(weight.shape), mean, var, floored_var, affine


class _ScaledStandardizeDevice(torch.autograd.Function):
    """Scaled WS on an accelerator in few kernels and no host synchronisation (CUDA, and the
    meta device, where tests count them). Forward :func:`_device_parts`. Backward: batch
    norm's training backward with the forward's statistics, which is the exact Scaled-WS
    gradient ``a·(δ − mean(δ)) − a·r²·(Σδc)·c`` of :class:`_ScaledStandardize` and gives
    ``Σδ·x̂`` (the gain's gradient) on the way; then for the units under the floor
    (``N·var < eps``), where that last term vanishes, the term added back,
    ``a·(Σδx̂)/eps·c`` (there ``r² = N/eps``), with a coefficient that is zero for every other
    unit, so that nothing asks the host which units are floored. A backward with
    ``create_graph=True`` recomputes the formula instead (:func:`_differentiable_backward`:
    double backward works)."""

    @staticmethod
    def forward(ctx, weight: Tensor, gain: Tensor | None, eps: float, gamma: float) -> Tensor:
        out, mean, var, floored_var, affine = _device_parts(weight, gain, eps, gamma)
        if isinstance(weight, nn.Parameter):
            remember_unit_stats(weight, mean, var=var)
        ctx.save_for_backward(weight, gain, mean, var, floored_var.rsqrt(), affine)
        ctx.eps, ctx.gamma = eps, gamma
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        weight, gain, mean, var, inv_std, affine = ctx.saved_tensors
        needs_weight, needs_gain = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True
            return *_differentiable_backward(
                grad_out, weight, gain, ctx.eps, ctx.gamma, needs_weight, needs_gain
            ), None, None  # fmt: skip
        rows = weight.reshape(1, weight.shape[0], -1)
        # dot = Σδ·x̂ per unit, x̂ = (W − μ)·rsqrt(max(var, eps/N)); always wanted (the floor)
        grad_rows, dot, _ = torch.ops.aten.native_batch_norm_backward(
            grad_out.reshape(rows.shape), rows, affine, None, None, mean, inv_std, True, 0.0,
            [needs_weight, True, False],
        )  # fmt: skip
        grad_weight = grad_gain = None
        if needs_weight:
            if ctx.eps > 0.0:  # + a·(Σδx̂)/eps·(W − μ) on the floored units, + 0 on the others
                coef = (dot * affine).mul_(var < ctx.eps / rows.shape[2]).unsqueeze(1)
                grad_rows[0].addcmul_(rows[0], coef, value=1.0 / ctx.eps)
                grad_rows[0].addcmul_(mean.unsqueeze(1), coef, value=-1.0 / ctx.eps)
            grad_weight = grad_rows.view(weight.shape)
        if needs_gain:
            grad_gain = dot * (ctx.gamma / math.sqrt(rows.shape[2]))
        return grad_weight, grad_gain, None, None


_NATIVE_DTYPES = (torch.float32, torch.float64)  # the dtypes of the native and device forms

# where Scaled WS runs as :class:`_ScaledStandardizeDevice` in eager mode (meta: to count them)
_SYNC_FREE_DEVICES = ("cuda", "meta")


def _sync_free_ok(weight: Tensor, gain: Tensor | None) -> bool:
    """Whether :func:`_device_standardize` takes this weight: float32/float64 with elements,
    no ``torch.func`` transform and no forward-mode tangent (a custom Function has neither)."""
    return weight.dtype in _NATIVE_DTYPES and weight.numel() > 0 and untransformed(weight, gain)


@torch.jit.unused
def _device_standardize(weight: Tensor, gain: Tensor | None, eps: float, gamma: float) -> Tensor:
    """Scaled WS in eager mode on an accelerator without a host read
    (:class:`_ScaledStandardizeDevice`); a parameter's statistics are kept for AGC
    (:func:`unit_norms_from_forward`), as on the CPU."""
    _reduce_dims(weight)  # a clear error for a weight without units
    if torch.is_grad_enabled() and (
        weight.requires_grad or (gain is not None and gain.requires_grad)
    ):
        return _ScaledStandardizeDevice.apply(weight, gain, eps, gamma)
    out, mean, var, _, _ = _device_parts(weight, gain, eps, gamma)
    if isinstance(weight, nn.Parameter):
        remember_unit_stats(weight, mean, var=var)
    return out


def scaled_standardize(
    weight: Tensor,
    gain: Tensor | None = None,
    eps: float = 1e-4,
    gamma: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Scaled WS (Brock et al. 2021a, eq. 2; official ``WSConv2D``), per output unit (dim 0):
    ``gain·γ·(W − μ)·rsqrt(max(N·var, eps))``, biased variance, ``N = W[0].numel()`` (fan-in),
    ``eps`` a floor on N·var (not added).

    ``gain`` has shape ``(out,)`` (``None`` means 1). Computed in ``weight``'s dtype. In eager
    mode on CPU it is group normalization with one group per unit (:func:`_standardize_rows`,
    train and eval alike): one fused kernel forward, group norm's fused backward through
    autograd (double backward works). Where a unit's N·var is below ``eps``, and under
    tracing / ``torch.compile`` / devices other than CPU and CUDA, an analytic backward is
    used when a gradient is needed. In eager mode
    on CUDA it is batch normalization's inference kernel with the statistics of one
    ``var_mean``, the floor applied on the device (:class:`_ScaledStandardizeDevice`, no host
    synchronisation). These analytic backwards recompute the formula when differentiated
    twice (``create_graph=True``): double backward works on every path. With the optional
    native kernels switched on (:mod:`normfree.nn.native`), eager CPU float32/float64 weights
    run the C++ forward and analytic backward instead (:class:`_ScaledStandardizeNative`).

    ``out_dtype`` (None: the weight's) is the dtype of the result: computed in the weight's
    dtype and rounded once, as ``.to(out_dtype)`` does. A CPU autocast training step asks for
    the convolution's bfloat16 (:meth:`ScaledStdConv2d.forward_scaled`); the native kernels then
    write a float32 weight's Ŵ as bfloat16 and read the bfloat16 gradient directly, which saves
    a cast of Ŵ each way (the same bits as the cast except in a NaN's payload, and the same
    gradients).
    """
    if gain is not None and gain.shape != weight.shape[:1]:
        raise ValueError(f"gain must have shape ({weight.shape[0]},), got {list(gain.shape)}")
    if gain is not None and gain.dtype != weight.dtype:
        gain = gain.to(weight.dtype)  # the result is in the weight's dtype on every path
    if not torch.jit.is_scripting():
        tracing = torch.jit.is_tracing()
        needs_grad = weight.requires_grad or (gain is not None and gain.requires_grad)
        eager = not (tracing or torch.compiler.is_compiling())
        if eager and weight.device.type == "cpu":
            _reduce_dims(weight)  # a clear error for a weight without units
            if under_functorch(weight, gain):  # torch.func over the weights: no value branch
                out = _scaled_standardize_parts(weight, gain, eps, gamma)[0]
                return _in_dtype(out, out_dtype)
            native_ok = weight.dtype in _NATIVE_DTYPES and weight.numel() > 0
            ext = native.extension("scaled_ws") if native_ok else None
            if ext is not None and has_tangent(weight, gain):
                ext = None  # the native functions detach their inputs: a tangent would be lost
            if ext is not None and (gain is None or gain.dtype == weight.dtype):
                bf16 = out_dtype == torch.bfloat16 and weight.dtype == torch.float32
                if needs_grad and torch.is_grad_enabled():
                    out = _ScaledStandardizeNative.apply(weight, gain, eps, gamma, bf16)
                else:
                    out = _native_standardize(ext, weight, gain, eps, gamma, bf16)[0]
                return _in_dtype(out, out_dtype)
            return _in_dtype(_eager_standardize(weight, gain, eps, gamma), out_dtype)
        if eager and weight.device.type in _SYNC_FREE_DEVICES and _sync_free_ok(weight, gain):
            return _in_dtype(_device_standardize(weight, gain, eps, gamma), out_dtype)
        if needs_grad and torch.is_grad_enabled() and not tracing:
            return _in_dtype(_ScaledStandardize.apply(weight, gain, eps, gamma), out_dtype)
    return _in_dtype(_scaled_standardize_parts(weight, gain, eps, gamma)[0], out_dtype)


def _in_dtype(out: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``out`` as ``dtype`` (None: as it is)."""
    return out if dtype is None else out.to(dtype)


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
