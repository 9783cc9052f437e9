"""Pooling layers and parameter-free shortcuts shared by several model families.

* :class:`MaxPoolSame`: the 3×3/2 max-pool of the ImageNet ResNet stem (DeepMind
  ``nfnets/nf_resnet.py``: ``hk.max_pool(padding='SAME')``), used by NF-ResNets, the normalized
  ResNet baselines, Fixup and MSR ResNets. On CPU an NCHW input is pooled in the channels-last
  layout (:func:`max_pool2d`), where PyTorch's kernel is ~10× faster.
* :class:`AvgPool2dSame` and :class:`AvgPoolShortcut`: the 2×2/2 average pool + 1×1 Scaled-WS conv
  of the strided shortcuts of NFNets (Brock et al. 2021b, arXiv 2102.06171, Fig. 4) and
  NF-RegNets (DeepMind ``nfnets/nfnet.py`` and ``nf_regnet.py``).
* :class:`ZeroPadShortcut`: the parameter-free "option A" shortcut (He et al. 2016, arXiv
  1512.03385, §4.2) of the small-image Fixup and MSR ResNets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normfree.nn.eager_forms import custom_function_ok, exporting, untransformed
from normfree.nn.padding import _pad_same_2d, same_padding_amounts
from normfree.nn.ws import ScaledStdConv2d

__all__ = [
    "AvgPool2dSame",
    "AvgPoolShortcut",
    "MaxPoolSame",
    "ZeroPadShortcut",
    "avg_pool2d_same",
    "max_pool2d",
    "max_pool2d_same",
]

# torch.fx leaves: the padding amounts depend on the input's size
torch.fx.wrap("_pad_same_2d")


class MaxPoolSame(nn.Module):
    """3×3 stride-2 max-pool with TF/JAX "SAME" padding (pads with -inf, extra pixel after),
    as the official stem's ``hk.max_pool(padding='SAME')``."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d_same(x, self.kernel_size, self.stride)


def _pool_out_size(size: int, k: int, s: int, pad: int, ceil_mode: bool) -> int:
    """Output size of PyTorch's max/avg pooling (``pooling_output_shape`` in ATen)."""
    out = (size + 2 * pad - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + pad:
        out -= 1
    return out


def max_pool2d_same(x: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Square max-pool with TF/JAX ``"SAME"`` padding (the padded cells never win).

    Where ``"SAME"`` pads ``(before, after)`` with ``after ≥ before``, PyTorch's own padding of
    ``before`` plus ``ceil_mode`` (a last window that runs past the edge) covers the same
    windows, so the pool runs on ``x`` itself instead of on a ``-inf``-padded copy (one
    activation-sized write and its backward saved in the ResNet stem). Where it cannot express
    the amounts, and under ``torch.jit.trace`` (whose sizes are tensors, which ``ceil_mode``
    cannot take), the explicit pad runs."""
    k, s = kernel_size, stride
    h, w = x.shape[-2], x.shape[-1]
    top, bottom = same_padding_amounts(h, k, s)
    left, right = same_padding_amounts(w, k, s)
    ceil_mode = bool(bottom > top or right > left)  # a SymBool under torch.export: a bool
    expected = ((h + s - 1) // s, (w + s - 1) // s)
    if (
        not torch.jit.is_tracing()
        and bottom >= top
        and right >= left
        and 2 * max(top, left) <= k
        and _pool_out_size(h, k, s, top, ceil_mode) == expected[0]
        and _pool_out_size(w, k, s, left, ceil_mode) == expected[1]
    ):
        return max_pool2d(x, k, s, (top, left), ceil_mode)
    x = _pad_same_2d(x, (k, k), (s, s), (1, 1), value=float("-inf"))
    return max_pool2d(x, k, s)


def max_pool2d(
    x: torch.Tensor, kernel_size: int, stride: int, padding: tuple[int, int] = (0, 0),
    ceil_mode: bool = False,
) -> torch.Tensor:  # fmt: skip
    """``F.max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)``, the same numbers
    and gradients, faster on CPU.

    PyTorch's CPU kernel for an NCHW input walks each window of each channel plane on its
    own; its channels-last kernel runs along the channels in vector registers. For the ResNet
    stem's 3×3/2 pool of an 8×64×64² input (torch 2.14, 2 threads) the NCHW forward takes
    7.8 ms, the channels-last one 0.6 ms, and the copies into and out of that layout 1.5 ms.
    So an NCHW-contiguous floating CPU input is pooled in channels-last layout and the
    output (and, with autograd, the argmax indices) copied back to NCHW; the backward is
    PyTorch's NCHW kernel with those indices (0.7 ms), exactly the plain backward. Both
    kernels take the first maximum of a window (ties and NaN included), so outputs, indices and
    gradients are bit-identical to the plain pool's (``tests/nn/test_max_pool_same.py``). Under
    ``torch.compile`` the same form runs as the operator ``normfree::max_pool2d_channels_last``
    (inductor's own NCHW pool is slower). Elsewhere (other devices and layouts, tracing,
    ``torch.export``, ``torch.func`` transforms, forward-mode AD) it is ``F.max_pool2d``."""
    if not torch.jit.is_scripting():
        if torch.compiler.is_compiling():
            fast = _compiled_channels_last_max_pool(x, kernel_size, stride, padding, ceil_mode)
        else:
            fast = _channels_last_max_pool(x, kernel_size, stride, padding, ceil_mode)
        if fast is not None:
            return fast
    return F.max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)


def _cpu_batch(x: torch.Tensor) -> bool:
    """Whether ``x`` is a floating CPU batch of more than one channel plane."""
    return x.device.type == "cpu" and x.dim() == 4 and x.is_floating_point() and x.shape[1] > 1


def _nchw(x: torch.Tensor) -> bool:
    """Whether ``x`` is NCHW-contiguous and not also channels-last (asked after the
    ``torch.func`` checks: a transform's tensor answers no layout queries)."""
    return x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)


@torch.jit.unused
def _channels_last_max_pool(
    x: torch.Tensor, k: int, s: int, padding: tuple[int, int], ceil_mode: bool
) -> torch.Tensor | None:
    """:func:`max_pool2d` in channels-last layout for an NCHW-contiguous floating CPU batch
    with more than one channel where a custom Function may run, else None."""
    if not (_cpu_batch(x) and custom_function_ok(x) and _nchw(x)):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return _ChannelsLastMaxPool.apply(x, k, s, padding, ceil_mode)
    cl = x.contiguous(memory_format=torch.channels_last)
    return F.max_pool2d(cl, k, s, padding, ceil_mode=ceil_mode).contiguous()


class _ChannelsLastMaxPool(torch.autograd.Function):
    """:func:`max_pool2d` with autograd: the forward in channels-last layout, the backward
    PyTorch's own (NCHW) with the forward's indices. Double backward works (the backward is a
    differentiable ATen op)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, kernel_size: int, stride: int, padding: tuple[int, int],
        ceil_mode: bool,
    ) -> torch.Tensor:  # fmt: skip
        out, indices = _pool_channels_last(x, kernel_size, stride, list(padding), ceil_mode)
        ctx.save_for_backward(x, indices)
        ctx.pool = (kernel_size, stride, list(padding), ceil_mode)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, indices = ctx.saved_tensors
        return _pool_grad(grad, x, indices, *ctx.pool), None, None, None, None


def _pool_channels_last(
    x: torch.Tensor, kernel_size: int, stride: int, padding: list[int], ceil_mode: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool of an NCHW ``x`` in channels-last layout: NCHW-contiguous output and argmax
    indices (flat positions in each channel plane, the same as the NCHW kernel's)."""
    cl = x.contiguous(memory_format=torch.channels_last)
    out, indices = F.max_pool2d(
        cl, kernel_size, stride, padding, ceil_mode=ceil_mode, return_indices=True
    )
    return out.contiguous(), indices.contiguous()


def _pool_grad(
    grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, kernel_size: int, stride: int,
    padding: list[int], ceil_mode: bool,
) -> torch.Tensor:  # fmt: skip
    """``∂L/∂x`` of the pool: PyTorch's NCHW backward with the forward's indices (a
    differentiable ATen op, so double backward works)."""
    k, s = kernel_size, stride
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad.contiguous(), x, [k, k], [s, s], padding, [1, 1], ceil_mode, indices
    )


def _register_operator() -> bool:
    """Register ``normfree::max_pool2d_channels_last`` with ``torch.library`` (public since
    torch 2.4; False where this torch has no ``custom_op``): under ``torch.compile`` inductor
    calls it as it is, where its own lowering of an NCHW max-pool is ~2.5× slower (forward
    and backward of the ResNet stem's pool, docs/benchmarks.md)."""
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return False

    # the schema spelled out: torch 2.4-2.5 infer none from PEP 585/604 annotations
    @custom_op(
        "normfree::max_pool2d_channels_last", mutates_args=(),
        schema="(Tensor x, int kernel_size, int stride, int[] padding, bool ceil_mode) "
        "-> (Tensor, Tensor)",
    )  # fmt: skip
    def pool_op(
        x: torch.Tensor, kernel_size: int, stride: int, padding: list[int], ceil_mode: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _pool_channels_last(x, kernel_size, stride, padding, ceil_mode)

    pool_op.register_fake(_pool_channels_last)  # the same ops on fake tensors give the shapes

    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        x, kernel_size, stride, padding, ceil_mode = inputs
        ctx.save_for_backward(x, output[1])
        ctx.pool = (kernel_size, stride, list(padding), ceil_mode)

    def backward(ctx, grad: torch.Tensor, _grad_indices: object) -> tuple:
        x, indices = ctx.saved_tensors
        return _pool_grad(grad, x, indices, *ctx.pool), None, None, None, None

    pool_op.register_autograd(backward, setup_context=setup_context)
    return True


_HAS_OPERATOR = _register_operator()


@torch.jit.unused
def _compiled_channels_last_max_pool(
    x: torch.Tensor, k: int, s: int, padding: tuple[int, int], ceil_mode: bool
) -> torch.Tensor | None:
    """Under ``torch.compile``: the channels-last pool as one opaque operator for an
    NCHW-contiguous floating CPU batch, else None (``torch.export``, ``torch.func``
    transforms, other layouts and devices get the plain pool)."""
    if not (_HAS_OPERATOR and not exporting() and _cpu_batch(x) and untransformed(x) and _nchw(x)):
        return None
    return torch.ops.normfree.max_pool2d_channels_last(x, k, s, list(padding), ceil_mode)[0]


torch.fx.wrap("max_pool2d_same")  # a torch.fx leaf: the padding depends on the input's size


class AvgPool2dSame(nn.Module):
    """Average pool with TF/JAX ``"SAME"`` padding whose padded cells are *not* counted.

    This is ``hk.avg_pool(padding='SAME')`` of the official code: output size
    ``ceil(in/stride)``, the extra padding pixel goes after, and every output is the mean of the
    window's in-bounds elements (Haiku divides the window sum by a window count of ones). For the
    2×2/2 pool of NFNet shortcuts this only matters on odd inputs: the windows of the last row
    and column hold two in-bounds values, the corner window one.
    """

    def __init__(self, kernel_size: int = 2, stride: int = 2) -> None:
        super().__init__()
        if kernel_size < 1 or stride < 1:
            raise ValueError(f"kernel_size and stride must be >= 1, got {kernel_size}, {stride}")
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool2d_same(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='same'"


def avg_pool2d_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """:class:`AvgPool2dSame`'s computation (a ``torch.fx`` leaf: it reads the input's size)."""
    top, bottom = same_padding_amounts(x.shape[-2], k, s, 1)
    left, right = same_padding_amounts(x.shape[-1], k, s, 1)
    if top == 0 and bottom == 0 and left == 0 and right == 0:
        return F.avg_pool2d(x, k, s)
    if top == 0 and left == 0 and k == s:
        # Padding only after and windows that tile the input: ceil_mode clips the last
        # window to the input and divides by its in-bounds size, exactly as SAME here.
        return F.avg_pool2d(x, k, s, ceil_mode=True, count_include_pad=False)
    pad = [left, right, top, bottom]
    summed = F.avg_pool2d(F.pad(x, pad), k, s)
    ones = x.new_ones([1, 1, x.shape[-2], x.shape[-1]])
    counts = F.avg_pool2d(F.pad(ones, pad), k, s)
    return summed / counts


torch.fx.wrap("avg_pool2d_same")


class AvgPoolShortcut(nn.Module):
    """Projection shortcut ``conv(pool(x))``: a "SAME" 2×2 average pool when ``stride > 1``
    (``pool`` is ``nn.Identity`` otherwise) followed by a 1×1 Scaled-WS conv (official
    ``conv_shortcut``; timm ``downsample.conv``)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.pool = AvgPool2dSame(2, stride) if stride > 1 else nn.Identity()
        self.conv = ScaledStdConv2d(in_ch, out_ch, 1, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class ZeroPadShortcut(nn.Module):
    """He et al. 2016 option-A shortcut: keep every ``stride``-th pixel and append
    ``out_ch − in_ch`` zero channels (no parameters)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(
                f"a zero-padding shortcut cannot reduce channels ({in_ch} -> {out_ch}); use a "
                "projection shortcut"
            )
        self.extra_channels = out_ch - in_ch
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels)) if self.extra_channels else x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"
