"""The matrix forms of a 1×1 convolution of an NCHW float CPU input and their gradients, each
pass in the form that measured faster inside whole training steps (docs/benchmarks.md):

* forward ``y_b = W·x_b + b``: per-sample products (``torch.bmm`` over the ``(C, H·W)`` view of
  each sample; ``torch.baddbmm`` with the bias as its addend, so the bias costs no second pass
  over the output) where :func:`product_pays`, else the convolution;
* ``∂L/∂x_b = Wᵀ·δ_b``: per-sample products where they pay and the weight fits in a core's
  cache (≤ 1 MiB, one read from memory for all samples), else the convolution's backward;
* ``∂L/∂W = Σ_b δ_b·x_bᵀ``: one product over all pixels of the batch, on copies of δ and x laid
  out ``(channels, B·H·W)``, where the weight is bigger than what one pixel row of the batch
  holds (``out·in > H·W·(out + in)``: small late-stage maps), else per-sample products summed
  over the batch; ``∂L/∂b = Σ δ``.

:func:`rule_forms` names the form each pass takes for a weight and map size, and
:func:`forward_in`, :func:`input_grad_in` and :func:`weight_grad_in` compute a pass in a given
form (``benchmarks/bench_pointwise.py`` times every form of every pass inside a model's training
steps, to check these rules on another machine).

They run in two wrappers with the same numbers: :class:`PointwiseConvFunction` in eager autograd
(its backward is built of differentiable ops, so double backward works) and, under
``torch.compile``, the custom operators ``normfree::pointwise_conv2d`` and
``normfree::pointwise_conv2d_backward`` (:func:`compiled_pointwise_conv2d`), which inductor calls
as they are: lowered by inductor itself the backward of a 1×1 convolution is oneDNN's
convolution backward (a compiled nf_resnet50 train step 1.08× the eager one) and the matrix
forms written out as graph ops measured 1.26–1.40×; as opaque operators the compiled step is
0.98× the eager one. The dispatch is :mod:`normfree.nn.pointwise_conv`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PassForms",
    "PointwiseConvFunction",
    "compiled_pointwise_conv2d",
    "forward_in",
    "input_grad_in",
    "per_sample_product",
    "pointwise_backward",
    "pointwise_forward",
    "product_pays",
    "rule_forms",
    "weight_grad_in",
]

# The per-sample product rereads the weight once per sample; it is the faster form while
# in·out ≤ _REREAD_LIMIT·H·W·(in + out), i.e. while the weight is small next to what a sample
# reads and writes (measured on NF-ResNet, NF-RegNet and NFNet shapes, docs/benchmarks.md).
_REREAD_LIMIT = 16
# A weight this small stays in a core's cache (2 MiB L2 on the machine measured) while every
# sample rereads it, so the per-sample products of the input gradient pay.
_CACHED_WEIGHT_BYTES = 1 << 20


def product_pays(weight: Tensor, area: int) -> bool:
    """Whether per-sample products ``W @ x_b`` beat the convolution: while the weight, reread
    once per sample, is small next to what a sample reads and writes."""
    return rule_forms(weight, area).forward == "product"


def per_sample_product(
    x: Tensor, weight: Tensor, bias: Tensor | None, fresh: bool = False
) -> Tensor:
    """``W @ x_b (+ b)`` for every sample of an NCHW-contiguous ``x``. ``fresh``: written
    through ``out=`` into a new NCHW tensor, which is no view (an ``autograd.Function``'s
    output may then be changed in place, e.g. by an in-place activation); otherwise a view of
    the plain product, which forward-mode AD passes through."""
    batch, channels, height, width = x.shape
    out = weight.shape[0]
    area = height * width
    matrix = weight.reshape(out, channels).expand(batch, out, channels)
    inputs = x.view(batch, channels, area)
    y = x.new_empty((batch, out, height, width)) if fresh else None
    target = y.view(batch, out, area) if fresh else None
    if bias is None:
        rows = torch.bmm(matrix, inputs, out=target)
    else:  # the bias as the product's C (beta = 1): no second pass over the output
        rows = torch.baddbmm(bias.reshape(1, out, 1).expand(batch, out, area), matrix, inputs,
                             out=target)  # fmt: skip
    return y if fresh else rows.view(batch, out, height, width)


class PassForms(NamedTuple):
    """The form of each pass of one 1×1 convolution: ``forward`` and ``input_grad`` are
    ``"product"`` (per-sample ``torch.bmm``) or ``"conv"`` (oneDNN); ``weight_grad`` is
    ``"pixels"`` (one GEMM over the batch's pixels), ``"samples"`` (per-sample products, summed)
    or ``"conv"`` (the convolution's weight gradient, which the rules never pick: a baseline
    for ``benchmarks/bench_pointwise.py``)."""

    forward: str
    input_grad: str
    weight_grad: str


def rule_forms(weight: Tensor, area: int) -> PassForms:
    """The forms the rules of this module pick for a ``(out, in, 1, 1)`` weight on maps of
    ``area = H·W`` pixels (module docstring)."""
    return _rule_forms(weight.shape[0], weight.shape[1], area, weight.element_size())


@functools.lru_cache(maxsize=1024)
def _rule_forms(out: int, channels: int, area: int, itemsize: int) -> PassForms:
    # cached: asked twice per layer and step, with a model's handful of shapes
    pays = out * channels <= _REREAD_LIMIT * area * (out + channels)
    cached = out * channels * itemsize <= _CACHED_WEIGHT_BYTES
    return PassForms(
        forward="product" if pays else "conv",
        input_grad="product" if pays and cached else "conv",
        weight_grad="pixels" if out * channels > area * (out + channels) else "samples",
    )


def forward_in(form: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv2d(x, weight, bias)`` in ``form`` (:class:`PassForms`): a new tensor, no view."""
    if form == "product":
        return per_sample_product(x, weight, bias, fresh=True)
    return F.conv2d(x, weight, bias)


def input_grad_in(form: str, grad: Tensor, x_shape: torch.Size, weight: Tensor) -> Tensor:
    """``∂L/∂x`` for an NCHW-contiguous upstream gradient ``grad``, in ``form``."""
    if form == "product":
        batch, out = grad.shape[0], weight.shape[0]
        matrix = weight.reshape(out, x_shape[1]).t().expand(batch, x_shape[1], out)
        rows = grad.view(batch, out, x_shape[2] * x_shape[3])  # no -1: a batch may be empty
        return torch.bmm(matrix, rows).view(x_shape)
    return torch.nn.grad.conv2d_input(x_shape, weight, grad)


def weight_grad_in(form: str, grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``∂L/∂W`` for an NCHW-contiguous upstream gradient ``grad`` and input ``x``, in
    ``form``."""
    if form == "conv":
        return torch.nn.grad.conv2d_weight(x, weight.shape, grad)
    batch, channels = x.shape[0], x.shape[1]
    out = weight.shape[0]
    area = x.shape[2] * x.shape[3]
    rows, inputs = grad.view(batch, out, area), x.view(batch, channels, area)
    if form == "pixels":
        pixels = rows.shape[0] * rows.shape[2]
        grad_w = torch.mm(rows.transpose(0, 1).reshape(out, pixels),
                          inputs.transpose(0, 1).reshape(channels, pixels).t())  # fmt: skip
    else:
        grad_w = torch.bmm(rows, inputs.transpose(1, 2)).sum(0)
    return grad_w.view(weight.shape)


def pointwise_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The forward of the training forms: a new tensor (no view of anything)."""
    return forward_in(rule_forms(weight, x.shape[2] * x.shape[3]).forward, x, weight, bias)


def pointwise_backward(
    grad: Tensor, x: Tensor, weight: Tensor, needs_input: bool, needs_weight: bool,
    needs_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """``(∂L/∂x, ∂L/∂W, ∂L/∂b)`` of :func:`pointwise_forward` for the upstream gradient
    ``grad``, each computed only where asked (None otherwise), in differentiable ops."""
    forms = rule_forms(weight, x.shape[2] * x.shape[3])
    grad = grad.contiguous()
    grad_x = grad_w = grad_b = None
    if needs_input:
        grad_x = input_grad_in(forms.input_grad, grad, x.shape, weight)
    if needs_weight:
        grad_w = weight_grad_in(forms.weight_grad, grad, x, weight)
    if needs_bias:
        grad_b = grad.view(grad.shape[0], grad.shape[1], x.shape[2] * x.shape[3]).sum((0, 2))
    return grad_x, grad_w, grad_b


class PointwiseConvFunction(torch.autograd.Function):
    """A 1×1 convolution of an NCHW float CPU input in eager autograd: :func:`pointwise_forward`
    and :func:`pointwise_backward`. Double backward works."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return pointwise_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad
        return pointwise_backward(grad, x, weight, needs_x, needs_w, ctx.has_bias and needs_b)


def _register_operators() -> bool:
    """Register ``normfree::pointwise_conv2d`` and its backward with ``torch.library`` (public
    since torch 2.4); False where this torch has no ``custom_op``."""
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return False

    # the schemas spelled out: torch 2.4-2.5 infer none from PEP 604 annotations
    @custom_op(
        "normfree::pointwise_conv2d", mutates_args=(),
        schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    )  # fmt: skip
    def forward_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return pointwise_forward(x, weight, bias)

    @forward_op.register_fake
    def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))

    @custom_op(
        "normfree::pointwise_conv2d_backward", mutates_args=(),
        schema="(Tensor grad, Tensor x, Tensor weight, bool needs_input, bool needs_weight, "
        "bool needs_bias) -> (Tensor, Tensor, Tensor)",
    )  # fmt: skip
    def backward_op(
        grad: Tensor, x: Tensor, weight: Tensor, needs_input: bool, needs_weight: bool,
        needs_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        grads = pointwise_backward(grad, x, weight, needs_input, needs_weight, needs_bias)
        none = x.new_empty(0)  # an operator returns tensors: empty where nothing was asked
        return tuple(none if g is None else g for g in grads)  # type: ignore[return-value]

    @backward_op.register_fake
    def _(
        grad: Tensor, x: Tensor, weight: Tensor, needs_input: bool, needs_weight: bool,
        needs_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        none = x.new_empty(0)
        return (
            torch.empty_like(x) if needs_input else none,
            weight.new_empty(weight.shape) if needs_weight else none,  # contiguous, as computed
            x.new_empty(weight.shape[0]) if needs_bias else none,
        )

    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        needs = list(ctx.needs_input_grad)
        needs[2] = needs[2] and ctx.has_bias
        grads = backward_op(grad, x, weight, *needs)
        return tuple(g if need else None for g, need in zip(grads, needs))

    forward_op.register_autograd(backward, setup_context=setup_context)
    return True


_HAS_OPERATORS = _register_operators()


def compiled_pointwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """The training forms as one opaque operator for ``torch.compile`` (module docstring), or
    None where this torch has no ``torch.library.custom_op`` (< 2.4: the convolution runs).
    First-order only: a compiled graph is never differentiated twice."""
    if not _HAS_OPERATORS:
        return None
    return torch.ops.normfree.pointwise_conv2d(x, weight, bias)
