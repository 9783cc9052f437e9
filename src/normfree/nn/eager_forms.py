"""When a hand-written eager form may stand in for PyTorch's plain operations.

normfree computes several layers in forms that are faster on CPU than the plain operations
with the same numbers: the 1×1 matrix forms (:mod:`normfree.nn.pointwise_conv`), the Scaled-WS
functions (:mod:`normfree.nn.ws_functional`), the tanh-GELU (:mod:`normfree.nn.activations`) and
the channels-last max-pool (:mod:`normfree.nn.pooling`). Most are ``torch.autograd.Function`` s,
which have no batching (``vmap``) or forward-mode (``jvp``) rule, and none of them should be
what a tracer or compiler records. The predicates here say when the plain operations must run
instead; every fast form asks them, so the rules live in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = [
    "cpu_autocast_dtype",
    "cpu_autocast_enabled",
    "custom_function_ok",
    "export_trace",
    "exporting",
    "has_tangent",
    "is_fx_proxy",
    "recording",
    "under_functorch",
    "untransformed",
]


def under_functorch(*tensors: Tensor | None) -> bool:
    """Whether a tensor is wrapped by a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``):
    such tensors have no storage of their own, and the plain operations, which every transform
    supports, run instead."""
    for t in tensors:
        if t is not None:
            try:
                t.untyped_storage()
            except (NotImplementedError, RuntimeError):
                return True
    return False


def has_tangent(*tensors: Tensor | None) -> bool:
    """Whether a tensor carries a forward-mode AD tangent (``torch.autograd.forward_ad``)."""
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def untransformed(*tensors: Tensor | None) -> bool:
    """Whether no ``torch.func`` transform wraps a tensor and none carries a forward-mode
    tangent: what a hand-written form (a custom ``autograd.Function`` or operator, with neither
    a ``vmap`` nor a ``jvp`` rule) needs of its inputs, eager or compiled."""
    return not (under_functorch(*tensors) or has_tangent(*tensors))


def cpu_autocast_enabled() -> bool:
    """Whether CPU autocast is on (``torch.autocast("cpu")``)."""
    return torch.is_autocast_enabled("cpu")


def cpu_autocast_dtype(tensor: Tensor) -> torch.dtype | None:
    """The dtype CPU autocast casts ``tensor`` to for an op it runs in lower precision (a
    convolution): its ``torch.get_autocast_dtype("cpu")`` where CPU autocast is on and
    ``tensor`` is a float32 CPU tensor, else None (autocast also casts float16 and bfloat16
    tensors, which normfree's forms already keep in their own dtype)."""
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or not cpu_autocast_enabled():
        return None
    return torch.get_autocast_dtype("cpu")


@torch.jit.unused
def is_fx_proxy(x: object) -> bool:
    """Whether ``x`` is a ``torch.fx`` proxy (a symbolic trace records the plain operations)."""
    return isinstance(x, torch.fx.Proxy)


_IS_EXPORTING = getattr(torch.compiler, "is_exporting", None)  # None before torch 2.7
_EXPORTS_RUNNING = 0  # torch.export traces run by normfree itself (export_trace)


@contextlib.contextmanager
def export_trace() -> Iterator[None]:
    """Mark a ``torch.export`` trace that normfree runs (:mod:`normfree.deploy`):
    :func:`exporting` is True inside it also on a torch without
    ``torch.compiler.is_exporting`` (before 2.7)."""
    global _EXPORTS_RUNNING
    _EXPORTS_RUNNING += 1
    try:
        yield
    finally:
        _EXPORTS_RUNNING -= 1


def exporting() -> bool:
    """Whether ``torch.export`` is tracing (``torch.compiler.is_exporting``, or a trace run
    inside :func:`export_trace`; a direct ``torch.export`` on a torch before 2.7 is not seen):
    an exported program holds only ATen operations, no normfree operator."""
    return _EXPORTS_RUNNING > 0 or bool(_IS_EXPORTING is not None and _IS_EXPORTING())


def recording() -> bool:
    """Whether ``torch.jit.trace`` or ``torch.compile`` (Dynamo, ``torch.export``) is recording
    the operations: a recorder sees the plain ones (inductor has its own kernels)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def custom_function_ok(*tensors: Tensor | None) -> bool:
    """Whether an eager ``torch.autograd.Function`` may replace the plain operations on
    ``tensors``: nothing records the operations (:func:`recording`, a ``torch.fx`` proxy), no
    ``torch.func`` transform wraps a tensor and none carries a forward-mode tangent (the
    Functions have neither a ``vmap`` nor a ``jvp`` rule)."""
    return not (recording() or any(is_fx_proxy(t) for t in tensors)) and untransformed(*tensors)
