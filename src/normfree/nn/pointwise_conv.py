"""1×1 convolutions computed in the form that is fastest on CPU, with the numbers of the
convolution (float rounding aside).

oneDNN, PyTorch's CPU convolution, is slow on three kinds of 1×1 convolution that normalizer-free
networks are full of; each has a matrix form here (timings: docs/benchmarks.md):

* **pooled input** ``(B, C, 1, 1)``, the squeeze-excite gates of NFNets (Hu et al. 2018; Brock
  et al. 2021b, §4.1): ``F.linear(x.flatten(1), W.flatten(1), b)``, 3–5× faster forward and
  backward at batch 8 (NFNet-F0's SE convs hold 21.8M of its 71.5M weights);
* **spatial input without autograd** (evaluation, inference): a per-sample product
  ``W @ x_b`` over the ``(C, H·W)`` view of each NCHW sample (``torch.bmm``), where the weight
  is small next to a sample's activations (``in·out ≤ 16·H·W·(in + out)``): 0.8–0.95× the time
  of the convolution on the ResNet and RegNet shapes measured. With small maps and wide layers
  (an NFNet's last stages at 4²) the product rereads a large weight once per sample and the
  convolution, which blocks over the batch, stays faster. In training the product measured no
  faster than the convolution's forward + backward, so there the convolution runs;
* **strided, no padding** (the transition shortcuts of NF-ResNets): a stride-1 convolution of
  ``x[..., ::s, ::s]``, the same products bit for bit, whose backward is 1.2–1.8× faster.

:class:`PointwiseConv2d` is an ``nn.Conv2d`` (same parameters, state-dict layout, hooks and
``isinstance`` checks; timm's and DeepMind's weights load unchanged) that runs
:func:`pointwise_conv2d`. Under ``torch.fx`` tracing, TorchScript, ``torch.jit.trace``,
``torch.compile``/``torch.export`` and for channels-last, autocast or non-float inputs these are
exactly the convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PointwiseConv2d",
    "is_pointwise",
    "is_strided_pointwise",
    "pointwise_conv2d",
    "strided_pointwise_conv2d",
]

# The per-sample product rereads the weight once per sample; it is the faster form while
# in·out ≤ _REREAD_LIMIT·H·W·(in + out), i.e. while the weight is small next to what a sample
# reads and writes (measured on NF-ResNet, NF-RegNet and NFNet shapes, docs/benchmarks.md).
_REREAD_LIMIT = 16
_MATMUL_DTYPES = (torch.float32, torch.float64)


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
    groups), computed as a matrix product where that is faster (module docstring): for a pooled
    ``(B, C, 1, 1)`` input in eager mode, and for an NCHW float CPU input when no gradient is
    needed and the weight is small next to a sample's activations."""
    if not torch.jit.is_scripting():
        fast = _as_matrix_product(x, weight, bias)
        if fast is not None:
            return fast
    return F.conv2d(x, weight, bias)


@torch.jit.unused
def _as_matrix_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """:func:`pointwise_conv2d` as a matrix product, or None where the convolution runs."""
    if (
        isinstance(x, torch.fx.Proxy)
        or isinstance(weight, torch.fx.Proxy)
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or x.dim() != 4
    ):
        return None
    batch, channels, height, width = x.shape
    out = weight.shape[0]
    if height == 1 and width == 1:
        return F.linear(x.flatten(1), weight.flatten(1), bias).view(batch, out, 1, 1)
    grad_needed = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    area = height * width
    if (
        grad_needed
        or x.device.type != "cpu"
        or x.dtype not in _MATMUL_DTYPES
        or weight.dtype != x.dtype
        or (bias is not None and bias.dtype != x.dtype)
        or _cpu_autocast_enabled()
        or not x.is_contiguous()
        or out * channels > _REREAD_LIMIT * area * (out + channels)
    ):
        return None
    y = torch.bmm(weight.reshape(out, channels).expand(batch, out, channels),
                  x.reshape(batch, channels, area))  # fmt: skip
    if bias is not None:
        y.add_(bias.reshape(out, 1))
    return y.view(batch, out, height, width)


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


def strided_pointwise_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int], groups: int
) -> Tensor:
    """A 1×1 convolution with ``stride`` and no padding. On CPU it runs as a stride-1
    convolution of ``x[..., ::sh, ::sw]``: the same products, so the same output bit for bit,
    but oneDNN's backward of a strided 1×1 convolution is 1.2–1.8× slower than that of the
    subsampled one (docs/benchmarks.md, "Whole-model training"). Elsewhere it is ``F.conv2d``."""
    if x.device.type == "cpu":
        return F.conv2d(x[:, :, :: stride[0], :: stride[1]], weight, bias, 1, 0, 1, groups)
    return F.conv2d(x, weight, bias, stride, 0, 1, groups)


class PointwiseConv2d(nn.Conv2d):
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

    def forward(self, x: Tensor) -> Tensor:
        return pointwise_conv2d(x, self.weight, self.bias)
