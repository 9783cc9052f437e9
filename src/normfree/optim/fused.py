"""Whether PyTorch's fused optimizer kernels (``torch.optim.SGD/Adam/AdamW(..., fused=True)``)
run for a set of parameters.

A fused optimizer updates each parameter in one kernel instead of a chain of elementwise ops.
On CPU (PyTorch ≥ 2.4) that is where a normfree model's training step spends its optimizer
time: for nf_resnet50 (25.5 M weights in 177 tensors, 2 threads) an SGD step with Nesterov
momentum and weight decay takes 10 ms fused against 25 ms in the default per-tensor loop
(33–36 ms with ``foreach``), and an
AdamW step 14 ms against 53 ms (docs/benchmarks.md). The update is the same; a few operations
are ordered differently, so results agree to rounding (float64 weights to 1e-10 after three
steps, ``tests/train/test_builders.py``), not always bit for bit.

Support depends on the PyTorch build, the device and the dtype, and older releases only say
so at the first step; :func:`fused_available` therefore asks PyTorch itself, by running one
step of the optimizer class on a one-element parameter of every (device, dtype) in use, and
caches the answer.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["fused_available"]


@functools.lru_cache(maxsize=64)
def _fused_step_runs(cls: type[Optimizer], device: torch.device, dtype: torch.dtype) -> bool:
    probe = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls([probe], lr=0.0, fused=True).step()  # type: ignore[call-arg]
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    return True


def fused_available(
    optimizer_class: type[Optimizer], params: Iterable[torch.Tensor | dict[str, Any]]
) -> bool:
    """True when ``optimizer_class(params, fused=True)`` can step every parameter of
    ``params`` (tensors or param-group dicts) on this PyTorch build: the class has a fused
    kernel for each of their (device, dtype) pairs. False for an empty ``params``, for classes
    without a ``fused`` option (RMSprop) and for non-floating parameters."""
    kinds: set[tuple[torch.device, torch.dtype]] = set()
    for item in params:
        tensors = item["params"] if isinstance(item, dict) else item
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        for p in tensors:
            if not p.is_floating_point():
                return False
            kinds.add((p.device, p.dtype))
    return bool(kinds) and all(_fused_step_runs(optimizer_class, d, t) for d, t in kinds)
