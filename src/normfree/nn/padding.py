"""TensorFlow / JAX ``"SAME"`` padding for PyTorch convolutions.

``"SAME"`` makes the output size ``ceil(in / stride)``. The total padding along a spatial axis is
``max((ceil(in / s) - 1)·s + (k - 1)·d + 1 - in, 0)``; TF/JAX put ``total // 2`` before and the
rest (one pixel more when the total is odd) *after*. PyTorch's ``padding=k // 2`` pads
symmetrically, which shifts the sampling grid of strided convs on even inputs, so the official
NFNet weights (Brock et al. 2021b, trained in JAX) need the asymmetric form.

Whether the padding depends on the input size is known from the layer alone:

* ``(k - 1)·d == 0`` (a 1×1 kernel): never any padding, for every stride.
* ``stride == 1`` and ``(k - 1)·d`` even: always ``(k - 1)·d / 2`` on both sides.
* anything else: the amounts depend on the input size, so the pad has to be computed per call.

:func:`static_same_padding` returns the symmetric padding when it exists so that a conv can pass
it to ``nn.Conv2d`` and skip the dynamic pad; :class:`Conv2dSame` is a plain ``nn.Conv2d`` that
pads dynamically when it must.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Conv2dSame",
    "conv_pair",
    "pad_same",
    "resolve_padding",
    "same_padding_amounts",
    "static_same_padding",
]


def same_padding_amounts(
    in_size: int, kernel: int, stride: int = 1, dilation: int = 1
) -> tuple[int, int]:
    """``(before, after)`` zero padding of one spatial axis under TF/JAX ``"SAME"``.

    The extra pixel of an odd total goes *after*, as in ``tf.nn.conv2d`` / ``jax.lax.conv``.
    """
    if in_size < 0 or kernel < 1 or stride < 1 or dilation < 1:
        raise ValueError(
            "same_padding_amounts needs in_size >= 0 and kernel, stride, dilation >= 1, got "
            f"in_size={in_size}, kernel={kernel}, stride={stride}, dilation={dilation}"
        )
    out_size = (in_size + stride - 1) // stride  # ceil(in / stride) in integer arithmetic
    total = max((out_size - 1) * stride + (kernel - 1) * dilation + 1 - in_size, 0)
    before = total // 2
    return before, total - before


def static_same_padding(
    kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int] | None:
    """Symmetric ``(pad_h, pad_w)`` equal to ``"SAME"`` for *every* input size, or ``None`` when
    the amounts depend on the input size (strided or even-extent kernels) and a dynamic pad is
    needed."""
    pads: list[int] = []
    for k, s, d in zip(kernel_size, stride, dilation):
        extent = (k - 1) * d
        if extent == 0:
            pads.append(0)
        elif s == 1 and extent % 2 == 0:
            pads.append(extent // 2)
        else:
            return None
    return pads[0], pads[1]


def _pad_same_2d(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    value: float = 0.0,
) -> Tensor:
    """TorchScript-friendly core of :func:`pad_same` (pairs only)."""
    top, bottom = same_padding_amounts(x.shape[-2], kernel_size[0], stride[0], dilation[0])
    left, right = same_padding_amounts(x.shape[-1], kernel_size[1], stride[1], dilation[1])
    if top == 0 and bottom == 0 and left == 0 and right == 0:
        return x
    return F.pad(x, [left, right, top, bottom], value=value)


torch.fx.wrap("_pad_same_2d")  # a torch.fx leaf: the amounts depend on the input's size


def conv_pair(
    value: int | tuple[int, int] | list[int], name: str, minimum: int = 1
) -> tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of ints ``>= minimum``; a clear error otherwise."""
    pair = (value, value) if isinstance(value, int) else value
    if not (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def resolve_padding(
    padding: str | int | tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[tuple[int, int], bool]:
    """Parse a conv's ``padding`` (``"same"``, ``"valid"``, int or pair) into
    ``(static_padding, needs_dynamic_same_pad)``; ``"same"`` uses the static symmetric padding
    whenever :func:`static_same_padding` finds one."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0), False
        if mode != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
        static = static_same_padding(kernel_size, stride, dilation)
        return ((0, 0), True) if static is None else (static, False)
    return conv_pair(padding, "padding", minimum=0), False


def pad_same(
    x: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    value: float = 0.0,
) -> Tensor:
    """Pad the last two dims of ``x`` (N, C, H, W) exactly like TF/JAX ``"SAME"`` (extra pixel
    after), so that a following conv with ``padding=0`` gives ``ceil(in / stride)`` outputs."""
    if x.dim() < 2:
        raise ValueError(
            f"pad_same needs a tensor with >= 2 dims (..., H, W), got shape {tuple(x.shape)}"
        )
    return _pad_same_2d(
        x,
        conv_pair(kernel_size, "kernel_size"),
        conv_pair(stride, "stride"),
        conv_pair(dilation, "dilation"),
        value,
    )


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TF/JAX ``"SAME"`` padding computed from each input's size.

    Used when ``"SAME"`` is not equivalent to a fixed symmetric padding (strided or even-extent
    kernels); otherwise a plain ``nn.Conv2d(padding=static_same_padding(...))`` is cheaper.
    It is an ``nn.Conv2d`` (same parameters and state-dict keys) whose ``padding`` is 0.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=0,
            dilation=dilation,
            groups=groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )

    def forward(self, x: Tensor) -> Tensor:
        x = _pad_same_2d(x, self.kernel_size, self.stride, self.dilation)
        return self._conv_forward(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding='same' (dynamic)"
