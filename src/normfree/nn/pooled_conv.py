"""The 1×1 convolutions of a squeeze-excite gate (Hu et al. 2018; NFNets, Brock et al. 2021b,
§4.1), which act on globally pooled ``(B, C, 1, 1)`` features.

:class:`PooledConv2d` is an ``nn.Conv2d`` (same parameters, state-dict layout, hooks and
``isinstance`` checks; timm's and DeepMind's weights load unchanged). With the optional native
CPU kernels switched on (:mod:`normfree.nn.native`) and a small batch, its eager-CPU
float32/float64 forward and backward run the native pooled linear map: one pass per output unit
over its weight row, which is what bounds this layer at small batch, and which also yields the
per-unit weight statistics (forward) and gradient norms (backward) that adaptive gradient
clipping would otherwise read the weight and the gradient again for
(:mod:`normfree.nn.unit_norms`). In NFNet-F0 these layers hold 21.8M of the 71.5M weights.
Everywhere else (tracing, ``torch.compile``/``torch.export``, scripting, other devices and
dtypes, larger batches, kernels off) it is exactly ``nn.Conv2d``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normfree.nn import native
from normfree.nn.unit_norms import remember_grad_norms, remember_unit_stats, wants_grad_norms

__all__ = ["PooledConv2d"]

# Above this batch the op path's GEMM is faster than one pass per unit: the kernel does
# 2·B multiply-adds per weight element and reads the (B, C) features from cache for each unit.
MAX_NATIVE_BATCH = 32


class _PooledLinearNative(torch.autograd.Function):
    """``y = x Wᵀ + b`` for ``x`` of shape ``(B, I)`` through the native kernels, keeping the
    parameter ``W``'s per-unit statistics (forward) and gradient norms (backward) for AGC.
    First-order only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ext = native.extension()
        rows = weight.detach().reshape(weight.shape[0], -1)
        out, mean, n_var = ext.pooled_linear_forward(
            x.detach().contiguous(), rows.contiguous(), None if bias is None else bias.detach()
        )
        number = None
        if isinstance(weight, nn.Parameter):
            number = remember_unit_stats(weight, mean, n_var)
        ctx.save_for_backward(x, weight)
        ctx.ext, ctx.forward_number, ctx.has_bias = ext, number, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        needs_bias = needs_bias and ctx.has_bias
        want_norm = needs_weight and wants_grad_norms(weight, ctx.forward_number)
        rows = weight.reshape(weight.shape[0], -1).contiguous()
        grad_x, grad_weight, grad_bias, grad_norm = ctx.ext.pooled_linear_backward(
            grad_out.contiguous(), x.contiguous(), rows, needs_x, needs_weight, needs_bias,
            want_norm,
        )  # fmt: skip
        if needs_weight:
            grad_weight = grad_weight.view(weight.shape)
            remember_grad_norms(weight, grad_weight, grad_norm, ctx.forward_number)
        return (
            grad_x if needs_x else None,
            grad_weight if needs_weight else None,
            grad_bias if needs_bias else None,
        )


class PooledConv2d(nn.Conv2d):
    """A 1×1 ``nn.Conv2d`` (stride 1, no padding, no groups) for pooled ``(B, C, 1, 1)``
    inputs, as in a squeeze-excite gate; with the native kernels on, a small eager-CPU batch
    runs the native pooled linear map (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            fast = _native_pooled(self, x)
            if fast is not None:
                return fast
        return nn.functional.conv2d(x, self.weight, self.bias)  # 1×1, stride 1, no padding


@torch.jit.unused
def _native_pooled(conv: PooledConv2d, x: Tensor) -> Tensor | None:
    """The native pooled linear map of ``conv`` on ``x`` where it applies, else None."""
    if (
        isinstance(x, torch.fx.Proxy)
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or x.device.type != "cpu"
        or x.dim() != 4
        or x.shape[2:] != (1, 1)
        or x.shape[0] > MAX_NATIVE_BATCH
        or x.dtype not in (torch.float32, torch.float64)
        or conv.weight.dtype != x.dtype
        or (conv.bias is not None and conv.bias.dtype != x.dtype)
        or native.extension() is None
    ):
        return None
    out = _PooledLinearNative.apply(x.reshape(x.shape[0], -1), conv.weight, conv.bias)
    return out.reshape(x.shape[0], -1, 1, 1)
