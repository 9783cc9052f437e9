"""Counting the ATen operations a block of PyTorch code dispatches (on CUDA, one kernel
launch each), shared by ``bench_dispatch.py`` and ``tests/test_dispatch.py``.

It is a ``__torch_dispatch__`` mode (PyTorch's documented extension point, which has no
public alias outside ``torch.utils._python_dispatch``): it sees every operation below
autograd, the backward's included.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HOST_READS", "DispatchCount", "count_step"]

# operations that allocate or alias without a kernel, and the profiler's markers
_FREE = {
    "alias", "as_strided", "detach", "empty", "empty_like", "empty_strided", "lift_fresh",
    "new_empty", "new_empty_strided", "_record_function_enter_new", "_record_function_exit",
    "record_stream", "set_", "resize_",
}  # fmt: skip
# operations that make the host wait for a value on the device
HOST_READS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "item"}


class DispatchCount(TorchDispatchMode):
    """Counts the ATen operations dispatched under it (``counts``, by name): views and
    :data:`_FREE` operations are left out, host reads (:data:`HOST_READS`) are counted and,
    on the meta device, answered with 0 so that the step runs to the end."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.counts[name] += 1
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if tensors and tensors[0].device.type == "meta" and name == "_local_scalar_dense":
                return 0
        elif not func.is_view and name not in _FREE:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> int:
        return sum(n for k, n in self.counts.items() if k not in HOST_READS)

    def host_reads(self) -> int:
        return sum(n for k, n in self.counts.items() if k in HOST_READS)


def count_step(step: Callable[[], object]) -> DispatchCount:
    """The operations of one call of ``step`` after a first, uncounted one (which builds
    caches and optimizer state)."""
    step()
    with DispatchCount() as counter:
        step()
    return counter
