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
# operations that make the host wait for a value on the device, and the name under which a
# blocking copy between host and device memory is counted (on CUDA it waits for the stream)
TRANSFER = "copy between host and device"
HOST_READS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "item", TRANSFER}


def _blocking_transfer(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether ``copy_`` / ``_to_copy`` moves data between the CPU and another device
    without ``non_blocking``."""
    if name == "copy_" and len(args) >= 2:
        devices = {args[0].device.type, args[1].device.type}
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    elif name == "_to_copy" and kwargs.get("device") is not None:
        devices = {args[0].device.type, torch.device(kwargs["device"]).type}
        non_blocking = kwargs.get("non_blocking", False)
    else:
        return False
    return len(devices) == 2 and "cpu" in devices and not non_blocking


class DispatchCount(TorchDispatchMode):
    """Counts the ATen operations dispatched under it (``counts``, by name): views and
    :data:`_FREE` operations are left out; host reads (:data:`HOST_READS`, blocking copies
    between the CPU and a device among them) are counted apart and, on the meta device,
    scalar reads are answered with 0 so that the step runs to the end."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if _blocking_transfer(name, args, kwargs or {}):
            name = TRANSFER
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
