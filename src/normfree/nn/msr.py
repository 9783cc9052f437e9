"""Mean Shift Rejection building blocks (Ruff, Beck, Bach 2019, arXiv 1911.13173).

MSR keeps every convolution on the **channel-wise zero-mean isocline**: each spatial kernel slice
``W[o, i, :, :]`` of a k×k conv has zero mean, so a spatially constant ("common-mode") input
signal produces no output and mean shifts cannot build up with depth. For a 1×1 conv, whose
slices are single numbers, the mean over the input channels of each filter ``W[o, :, 0, 0]`` is
zero instead (the rule of the authors' ``InitUtil.ConvWeightInit``).

* :func:`zero_mean_init_` / :func:`apply_zero_mean_init`: the initialisation (§3 (1) of the
  abstract): zero-mean slices, then each filter ``W[o]`` rescaled to a chosen L2 norm
  ("unity kernel magnitude", default 1) or to its pre-shift norm.
* :func:`kernel_mean_dims` / :func:`kernel_slice_means`: which axes the zero-mean constraint
  averages over, and the constrained means themselves (for checks and diagnostics).
* :class:`ChannelNoise`: the training-only noise injection (§3 (3)): per-example, per-channel
  multiplicative ``U[1−δ, 1+δ]`` and optional additive ``U[−s, s]`` noise ("deep data
  augmentation"), identity in eval.

The per-step gradient projection that keeps the weights on the isocline is in
:mod:`normfree.optim.msr`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "CONV_TYPES",
    "ChannelNoise",
    "apply_zero_mean_init",
    "channel_noise",
    "kernel_mean_dims",
    "kernel_slice_means",
    "zero_mean_conv_weights",
    "zero_mean_init_",
]

#: Convolution modules whose ``weight`` MSR constrains (subclasses such as WS convs included;
#: transposed convs, whose weight layout is ``(in, out, ...)``, are not).
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

IncludeSpec = Callable[[str, nn.Module], bool] | Iterable[str] | str | None


def kernel_mean_dims(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The axes averaged by the zero-mean constraint of a conv weight ``(O, I, *kernel)``:
    the spatial axes for a k×k (any kernel with more than one tap), the input-channel axis 1 for
    a 1×1 (every kernel dim is 1). Raises ``ValueError`` for tensors that are not conv kernels
    and for 1×1 kernels with a single input channel (zero mean would make them zero)."""
    shape = tuple(shape)
    if len(shape) < 3:
        raise ValueError(
            f"MSR constrains conv kernels (O, I, *kernel) with ndim >= 3, got shape {shape}"
        )
    spatial = tuple(range(2, len(shape)))
    if math.prod(shape[2:]) > 1:
        return spatial
    if shape[1] < 2:
        raise ValueError(
            f"a 1x1 kernel with one input channel (shape {shape}) cannot be made zero-mean "
            "without becoming zero; leave it out of MSR"
        )
    return (1, *spatial)


def kernel_slice_means(weight: Tensor) -> Tensor:
    """The means the MSR constraint sets to zero (keepdim), in float64 for float64 input and
    float32 otherwise: per (o, i) slice for k×k kernels, per filter o for 1×1 kernels."""
    dims = kernel_mean_dims(weight.shape)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.detach().mean(dim=dims, keepdim=True, dtype=dtype)


@torch.no_grad()
def zero_mean_init_(weight: Tensor, magnitude: float | None = 1.0) -> Tensor:
    """Zero-mean initialisation of a conv weight, in place (Ruff et al. 2019, §3 (1)).

    Every kernel slice ``W[o, i, ...]`` is made zero-mean (1×1 kernels: ``W[o, :, 0, 0]`` over
    the input channels), then each filter ``W[o]`` is rescaled to L2 norm ``magnitude``
    (``None``: to its norm before the mean was removed). Computed in float64. Returns ``weight``.
    A filter that is zero after mean removal cannot be given a norm and raises ``ValueError``.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if magnitude is not None:
        if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)):
            raise TypeError(f"magnitude must be a float or None, got {type(magnitude).__name__}")
        if not (math.isfinite(magnitude) and magnitude > 0.0):
            raise ValueError(f"magnitude must be a positive finite number or None, got {magnitude}")
    dims = kernel_mean_dims(weight.shape)
    w = weight.detach().to(torch.float64)
    filter_dims = tuple(range(1, w.ndim))
    before = torch.linalg.vector_norm(w, dim=filter_dims, keepdim=True)
    w = w - w.mean(dim=dims, keepdim=True)
    after = torch.linalg.vector_norm(w, dim=filter_dims, keepdim=True)
    target = before if magnitude is None else torch.full_like(before, float(magnitude))
    rescale = target > 0
    if bool((rescale & (after == 0)).any()):
        bad = torch.nonzero((rescale & (after == 0)).flatten()).flatten().tolist()
        raise ValueError(f"filters {bad} are zero after mean removal and cannot be rescaled")
    w = torch.where(rescale, w * (target / torch.where(after > 0, after, 1.0)), w)
    weight.copy_(w.to(weight.dtype))
    return weight


def _selected(name: str, module: nn.Module, include: IncludeSpec) -> bool:
    if include is None:
        return True
    if callable(include):
        return bool(include(name, module))
    patterns = [include] if isinstance(include, str) else list(include)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def zero_mean_conv_weights(
    model: nn.Module, include: IncludeSpec = None
) -> list[tuple[str, Tensor]]:
    """``(qualified name, weight)`` of every conv in ``model`` that MSR constrains.

    ``include``: ``None`` selects every :data:`CONV_TYPES` module except 1×1 convs with a single
    input channel per group (depthwise 1×1, which cannot be zero-mean); otherwise a predicate
    ``(module_name, module) -> bool`` or module-name ``fnmatch`` patterns, applied to the conv
    modules (an explicitly selected depthwise 1×1 raises)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, CONV_TYPES) or not _selected(name, module, include):
            continue
        shape = module.weight.shape
        if include is None and math.prod(shape[2:]) == 1 and shape[1] < 2:
            continue
        kernel_mean_dims(shape)  # validates explicit selections
        out.append((f"{name}.weight" if name else "weight", module.weight))
    return out


def apply_zero_mean_init(
    model: nn.Module, magnitude: float | None = 1.0, include: IncludeSpec = None
) -> list[str]:
    """Apply :func:`zero_mean_init_` to the convs of ``model`` selected by ``include`` (see
    :func:`zero_mean_conv_weights`). Returns the names of the initialised weights."""
    selected = zero_mean_conv_weights(model, include)
    for _, weight in selected:
        zero_mean_init_(weight, magnitude)
    return [name for name, _ in selected]


def channel_noise(x: Tensor, delta: float, shift: float) -> Tensor:
    """``x[n, c]·a[n, c] + b[n, c]`` with ``a ~ U[1−δ, 1+δ]``, ``b ~ U[−s, s]`` drawn per example
    and channel (see :class:`ChannelNoise`). A leaf of ``torch.fx`` traces (it reads the shape)."""
    if x.ndim < 2:
        raise ValueError(f"ChannelNoise expects input (N, C, ...), got shape {list(x.shape)}")
    shape = [x.shape[0], x.shape[1]] + [1] * (x.ndim - 2)
    out = x
    if delta > 0.0:
        scale = torch.empty(shape, dtype=x.dtype, device=x.device)
        out = out * scale.uniform_(1.0 - delta, 1.0 + delta)
    if shift > 0.0:
        offset = torch.empty(shape, dtype=x.dtype, device=x.device)
        out = out + offset.uniform_(-shift, shift)
    return out


torch.fx.wrap("channel_noise")


class ChannelNoise(nn.Module):
    """Training-only channel noise of MSR (Ruff et al. 2019, §3 (3); the authors'
    ``PerMapRandomScalingLayer``): ``y[n, c] = x[n, c]·a[n, c] + b[n, c]`` with independent
    ``a ~ U[1−δ, 1+δ]`` and ``b ~ U[−s, s]`` per example n and channel c (constant over the
    spatial positions). Identity in eval mode. ``0 ≤ δ ≤ 1`` keeps ``a`` in the reference code's
    clipping range [0, 2]. Works for any input ``(N, C, ...)``."""

    def __init__(self, delta: float = 0.15, shift: float = 0.0) -> None:
        super().__init__()
        for label, value, high in (("delta", delta, 1.0), ("shift", shift, math.inf)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{label} must be a float, got {type(value).__name__}")
            if not (0.0 <= value <= high) or math.isnan(value) or math.isinf(value):
                raise ValueError(f"{label} must be in [0, {high:g}], got {value}")
        self.delta = float(delta)
        self.shift = float(shift)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or (self.delta == 0.0 and self.shift == 0.0):
            return x
        return channel_noise(x, self.delta, self.shift)

    def extra_repr(self) -> str:
        return f"delta={self.delta:g}, shift={self.shift:g}"
