"""Pooling layers and parameter-free shortcuts shared by several model families.

* :class:`MaxPoolSame`: the 3×3/2 max-pool of the ImageNet ResNet stem (DeepMind
  ``nfnets/nf_resnet.py``: ``hk.max_pool(padding='SAME')``), used by NF-ResNets, the normalized
  ResNet baselines, Fixup and MSR ResNets.
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

from normfree.nn.padding import _pad_same_2d, same_padding_amounts
from normfree.nn.ws import ScaledStdConv2d

__all__ = [
    "AvgPool2dSame",
    "AvgPoolShortcut",
    "MaxPoolSame",
    "ZeroPadShortcut",
    "avg_pool2d_same",
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
    the amounts, the explicit pad runs."""
    k, s = kernel_size, stride
    h, w = x.shape[-2], x.shape[-1]
    top, bottom = same_padding_amounts(h, k, s)
    left, right = same_padding_amounts(w, k, s)
    ceil_mode = bottom > top or right > left
    expected = ((h + s - 1) // s, (w + s - 1) // s)
    if (
        bottom >= top
        and right >= left
        and 2 * max(top, left) <= k
        and _pool_out_size(h, k, s, top, ceil_mode) == expected[0]
        and _pool_out_size(w, k, s, left, ceil_mode) == expected[1]
    ):
        return F.max_pool2d(x, k, s, padding=(top, left), ceil_mode=ceil_mode)
    x = _pad_same_2d(x, (k, k), (s, s), (1, 1), value=float("-inf"))
    return F.max_pool2d(x, k, s)


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
