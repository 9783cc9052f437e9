"""1×1 convolutions computed in the form that is fastest on CPU, with the numbers of the
convolution (float rounding aside).

oneDNN, PyTorch's CPU convolution, is slow on the 1×1 convolutions that normalizer-free
networks are full of (a ResNet-50 bottleneck has two of its three convs 1×1). Each kind has a
matrix form here, chosen from timings inside whole training and evaluation steps
(docs/benchmarks.md, "1×1 convs in matrix form, pass by pass"):

* **pooled input** ``(B, C, 1, 1)``, the squeeze-excite gates of NFNets (Hu et al. 2018; Brock
  et al. 2021b, §4.1): ``F.linear(x.flatten(1), W.flatten(1), b)``, 3–5× faster forward and
  backward at batch 8 (NFNet-F0's SE convs hold 21.8M of its 71.5M weights);
* **spatial NCHW float input on CPU**, each pass in its own form: the output as per-sample
  products ``W·x_b`` (``torch.bmm`` over the ``(C, H·W)`` view of each sample) while the
  weight, reread once per sample, is small next to a sample's data
  (``in·out ≤ 16·H·W·(in + out)``); the input gradient the same way when the weight also fits
  a core's cache; the weight gradient as one product over all the batch's pixels on small maps
  and as per-sample products summed over the batch on large ones (the kernels are in
  :mod:`normfree.nn.pointwise_kernels`).
  The convolution itself runs wherever a rule says no. nf_resnet50 evaluates 1.055× → 0.997×
  the time of a ResNet-50 with no normalization at all, and trains 0.96× the time of the
  all-convolution form; nf_regnet_b0 0.84× and 0.88×;
* **strided, no padding** (the transition shortcuts of NF-ResNets): the stride-1 form of
  ``x[..., ::s, ::s]`` (the same products), whose backward is 1.2–1.8× faster as a
  convolution and faster again in the matrix forms above.

:class:`PointwiseConv2d` is an ``nn.Conv2d`` (same parameters, state-dict layout, hooks and
``isinstance`` checks; timm's and DeepMind's weights load unchanged) that runs
:func:`pointwise_conv2d`. Under ``torch.compile`` a spatial float CPU input with autograd runs
the training forms as one opaque custom operator (``normfree::pointwise_conv2d``, torch ≥ 2.4),
which inductor calls as it is; without autograd (compiled evaluation) and under
``torch.export`` it is the convolution, which inductor lowers to a matrix product with
:func:`compile_options`. Under ``torch.fx`` tracing, TorchScript, ``torch.jit.trace`` and
``torch.func`` transforms these are exactly the convolution; so are spatial inputs that are
channels-last, under autocast, not float32/float64 or not on CPU, and training steps with
forward-mode AD tangents. A pooled ``(B, C, 1, 1)`` float input takes ``F.linear`` in eager
mode and under ``torch.compile``, on every device (on CUDA that follows the matmul TF32
setting, off by default, not cuDNN's), so a compiled graph's backward is a matrix product too
(oneDNN's backward of such a convolution took 7 % of a compiled NFNet-F0 step); ``torch.export``
keeps the convolution.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normfree.nn.eager_forms import (
    cpu_autocast_enabled,
    exporting,
    has_tangent,
    is_fx_proxy,
    under_functorch,
)
from normfree.nn.pointwise_kernels import (
    PointwiseConvFunction,
    compiled_pointwise_conv2d,
    per_sample_product,
    product_pays,
)

__all__ = [
    "PointwiseConv2d",
    "compile_options",
    "is_pointwise",
    "is_strided_pointwise",
    "pointwise_conv2d",
    "pointwise_matmul",
    "pointwise_matmul_enabled",
    "set_pointwise_matmul",
    "strided_pointwise_conv2d",
]

_MATMUL_DTYPES = (torch.float32, torch.float64)
_ENV = "NORMFREE_POINTWISE_MATMUL"
_enabled = os.environ.get(_ENV, "").strip().lower() not in ("0", "false", "no", "off")


def set_pointwise_matmul(enabled: bool) -> None:
    """Run 1×1 convolutions in their matrix forms (``True``, the default) or always as the
    convolution (``False``: e.g. on a CPU where the rules' constants, measured on a 2-core
    x86 VM, do not pay, or to get oneDNN's numbers bit for bit). ``NORMFREE_POINTWISE_MATMUL=0``
    in the environment switches them off for a whole process, ``normfree train`` included."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _enabled = enabled


def pointwise_matmul_enabled() -> bool:
    """Whether 1×1 convolutions run in their matrix forms where the rules say so."""
    return _enabled


@contextlib.contextmanager
def pointwise_matmul(enabled: bool) -> Iterator[None]:
    """``with pointwise_matmul(flag):`` runs its body with the matrix forms on or off and
    restores the previous setting on exit (also when the body raises)."""
    global _enabled
    previous = _enabled
    try:
        set_pointwise_matmul(enabled)
        yield
    finally:
        _enabled = previous


def _unpadded_1x1(conv: nn.Conv2d) -> bool:
    return (
        tuple(conv.kernel_size) == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.padding_mode == "zeros"
    )


def is_pointwise(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a 1×1 convolution with stride 1, no padding and no groups, which
    :func:`pointwise_conv2d` computes."""
    return _unpadded_1x1(conv) and tuple(conv.stride) == (1, 1) and conv.groups == 1


def is_strided_pointwise(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a 1×1 convolution with a stride and no padding (a transition
    shortcut), which :func:`strided_pointwise_conv2d` computes."""
    return _unpadded_1x1(conv) and tuple(conv.stride) != (1, 1)


def pointwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a ``(out, in, 1, 1)`` weight (stride 1, no padding, no
    groups), computed in matrix form where that is faster (module docstring): ``F.linear`` for a
    pooled ``(B, C, 1, 1)`` input (also under ``torch.compile``, not ``torch.export``); for an
    NCHW float CPU input, per-sample products without autograd and
    :class:`~normfree.nn.pointwise_kernels.PointwiseConvFunction` (each pass in its faster
    form) with it."""
    if not torch.jit.is_scripting():
        fast = _as_matrix_product(x, weight, bias)
        if fast is not None:
            return fast
    return F.conv2d(x, weight, bias)


@torch.jit.unused
def _as_matrix_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """:func:`pointwise_conv2d` in matrix form, or None where the convolution runs."""
    if not _enabled or is_fx_proxy(x) or is_fx_proxy(weight) or x.dim() != 4:
        return None
    if torch.jit.is_tracing() or x.shape[1] != weight.shape[1]:
        return None  # (the wrong channel count: F.conv2d's own error names it)
    batch, _, height, width = x.shape
    if height == 1 and width == 1:
        if not x.is_floating_point() or exporting():  # an exported program keeps the conv
            return None
        out = F.linear(x.flatten(1), weight.flatten(1), bias)
        return out.view(batch, weight.shape[0], 1, 1)
    if torch.compiler.is_compiling():
        return _compiled_form(x, weight, bias)
    if not _matrix_input(x, weight, bias) or under_functorch(x, weight, bias):
        return None
    if _grad_needed(x, weight, bias):
        if has_tangent(x, weight, bias):  # forward AD: the Function has no jvp
            return None
        return PointwiseConvFunction.apply(x, weight, bias)
    if not product_pays(weight, height * width):
        return None
    return per_sample_product(x, weight, bias)


def _matrix_input(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the matrix forms take this spatial input: NCHW-contiguous float32/float64 on
    CPU, the weight and bias of its dtype, no CPU autocast."""
    return (
        x.device.type == "cpu"
        and x.dtype in _MATMUL_DTYPES
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and not cpu_autocast_enabled()
        and x.is_contiguous()
    )


def _grad_needed(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


def _compiled_form(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """Under ``torch.compile``: a spatial NCHW float CPU input runs the eager forms as one
    opaque operator (:func:`normfree.nn.pointwise_kernels.compiled_pointwise_conv2d`), with or
    without autograd; other layouts and dtypes and ``torch.export`` get the convolution, which
    inductor lowers to a matrix product with :func:`compile_options` (pooled inputs never
    come here: they are ``F.linear``, forward and backward).

    The operator has no forward-mode or batching rule: ``torch.func.jvp`` inside a compiled
    function gives a zero tangent through it and ``torch.func.grad`` fails to trace. Switch the
    matrix forms off (:func:`set_pointwise_matmul`) to compile ``torch.func`` transforms of
    these models; eager ``torch.func`` transforms take the convolution by themselves.

    Some PyTorch releases (2.11) fold ``torch.compiler.is_exporting()`` to True in every
    Dynamo trace; there every compiled 1×1 conv stays a convolution (correct, lowered by
    ``conv_1x1_as_mm``, without the faster forms)."""
    if (
        exporting()
        or x.shape[2] * x.shape[3] == 1
        or not _matrix_input(x, weight, bias)
    ):
        return None
    return compiled_pointwise_conv2d(x, weight, bias)


def compile_options(device: torch.device | str) -> dict[str, bool]:
    """Options of the inductor backend for ``torch.compile(model, options=...)`` of a model on
    ``device``. On CPU: lower the 1×1 convolutions that stay convolutions in a compiled graph
    (channels-last inputs; pooled ones are ``F.linear`` already) to matrix products
    (``conv_1x1_as_mm``; the NCHW spatial ones run as ``normfree::pointwise_conv2d``, module
    docstring), and keep the model's NCHW layout instead of converting the convolutions to
    channels-last (``layout_optimization=False``: with the conversion a compiled nf_resnet50
    train step measured 1.27× the eager one, without it 1.00–1.02×, in one-process A/Bs;
    docs/benchmarks.md). None elsewhere, where nothing was measured."""
    if torch.device(device).type == "cpu":
        return {"conv_1x1_as_mm": True, "layout_optimization": False}
    return {}


def strided_pointwise_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int], groups: int
) -> Tensor:
    """A 1×1 convolution with ``stride`` and no padding. On CPU it runs as a stride-1
    convolution of ``x[..., ::sh, ::sw]`` (:func:`pointwise_conv2d` of a contiguous copy for an
    NCHW input without groups): the same products, but oneDNN's backward of a strided 1×1
    convolution is 1.2–1.8× slower than that of the subsampled one, and the matrix forms are
    faster again (docs/benchmarks.md, "Whole-model training"). Elsewhere it is ``F.conv2d``."""
    if not torch.jit.is_scripting():
        if is_fx_proxy(x):  # a trace records the plain strided convolution
            return F.conv2d(x, weight, bias, stride, 0, 1, groups)
    if x.device.type == "cpu" and x.dim() == 4:  # an unbatched (C, H, W) input: the conv
        sub = x[:, :, :: stride[0], :: stride[1]]
        if groups == 1 and x.is_contiguous():
            return pointwise_conv2d(sub.contiguous(), weight, bias)
        return F.conv2d(sub, weight, bias, 1, 0, 1, groups)
    return F.conv2d(x, weight, bias, stride, 0, 1, groups)


# the nn.Conv2d attributes that decide which form a conv takes
_FORM_ATTRIBUTES = frozenset({"kernel_size", "stride", "padding", "groups", "padding_mode"})


class _PointwiseForms:
    """Mixin of ``nn.Conv2d`` subclasses whose ``forward`` runs a 1×1 conv (plain or strided)
    in the forms of this module and any other conv as ``nn.Conv2d`` does; TorchScript-able
    (the kind is a bool attribute, found once)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._find_form()

    def _find_form(self) -> None:
        conv: nn.Conv2d = self  # type: ignore[assignment]
        self.pointwise = is_pointwise(conv)
        self.strided_pointwise = is_strided_pointwise(conv)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        # a conv changed after construction (e.g. its stride, in model surgery) finds its form
        # again; during construction _find_form runs once at the end
        if name in _FORM_ATTRIBUTES and "strided_pointwise" in self.__dict__:
            self._find_form()

    def __setstate__(self, state: dict) -> None:  # modules pickled before these attributes
        super().__setstate__(state)  # type: ignore[misc]
        if "pointwise" not in state or "strided_pointwise" not in state:
            self._find_form()

    def forward(self, x: Tensor) -> Tensor:
        if self.pointwise:
            return pointwise_conv2d(x, self.weight, self.bias)  # type: ignore[attr-defined]
        if self.strided_pointwise:
            return strided_pointwise_conv2d(
                x, self.weight, self.bias, self.stride, self.groups  # type: ignore[attr-defined]
            )
        return self._conv_forward(x, self.weight, self.bias)  # type: ignore[attr-defined]


class PointwiseConv2d(_PointwiseForms, nn.Conv2d):
    """A 1×1 ``nn.Conv2d`` (stride 1, no padding, no groups) computed by
    :func:`pointwise_conv2d`: the squeeze-excite convs of NFNets and the folded 1×1 convs of
    :func:`normfree.deploy.prepare_for_inference`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)
