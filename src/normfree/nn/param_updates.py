"""Parameter updates that a tensor's version counter misses, and what normfree's caches key on
instead.

The inference cache of the Scaled-WS convs (:mod:`normfree.nn.ws`) and the per-unit weight
statistics that adaptive gradient clipping reads (:mod:`normfree.nn.unit_norms`) are valid
while the parameters they were computed from are unchanged. PyTorch's version counter
(``tensor._version``) counts in-place writes through autograd-visible ops, but PyTorch's fused
optimizer kernels (``torch.optim.SGD/Adam/AdamW(..., fused=True)``, CPU and CUDA; measured on
torch 2.14) write the parameters without bumping it: after ``opt.step()`` the version is the
same and the weights are not. So these caches also key on :func:`optimizer_steps`, the number
of optimizer steps taken in this process, counted by a global step post-hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``, public since torch 2.0), and on
the tensor's memory, dtype, device, shape and strides (:func:`tensor_key`), which catch
``param.data = ...``, ``Module.to()`` / ``.cuda()`` and views.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["optimizer_steps", "tensor_key"]

_steps = 0


def _count_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    global _steps
    _steps += 1


_HOOK = register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """How many ``optimizer.step()`` calls (of any optimizer) have finished in this process."""
    return _steps


def tensor_key(tensor: Tensor) -> tuple:
    """What identifies ``tensor``'s current values short of reading them: its version, memory,
    dtype, device, shape and strides, and the number of optimizer steps so far (module
    docstring). Not for inference tensors, which keep no version (``tensor.is_inference()``)."""
    return (
        tensor._version,
        tensor.data_ptr(),
        tensor.dtype,
        tensor.device,
        tuple(tensor.shape),
        tensor.stride(),
        _steps,
    )
