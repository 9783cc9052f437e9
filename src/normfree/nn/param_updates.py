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
``param.data = t`` with other memory, ``Module.to()`` / ``.cuda()`` and views. Writes through
``param.data`` or another tensor sharing the parameter's memory are seen by none of these:
:func:`normfree.nn.clear_caches` is for after them.

What these registries keep per parameter lives as long as the parameter's memory: they hold a
weak reference to its storage, never to the tensor (:func:`memory_ref`), because PyTorch's
``torch.utils.swap_tensors`` (which ``Module.to()`` and ``load_state_dict`` use under
``torch.__future__.set_swap_module_params_on_conversion(True)``, and FSDP2) refuses a tensor
that has weak references.

It also holds the updates that run *inside* the backward (:func:`set_backward_update`): an
optimizer step for one Scaled-WS weight that its native backward applies row by row instead of
writing the weight's gradient (:mod:`normfree.optim.backward_update` registers them).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = [
    "backward_update", "holds_memory_of", "memory_ref", "optimizer_steps", "set_backward_update",
    "tensor_key",
]  # fmt: skip

# id(weight) → (weak ref to its storage, its update): see set_backward_update
_BACKWARD_UPDATES: dict[int, tuple[weakref.ref, Callable]] = {}

_steps = 0


def _count_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    global _steps
    _steps += 1


_HOOK = register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """How many ``optimizer.step()`` calls (of any optimizer) have finished in this process."""
    return _steps


def memory_ref(
    tensor: Tensor, callback: Callable[[weakref.ref], object] | None = None
) -> weakref.ref | None:
    """A weak reference to ``tensor``'s storage (PyTorch keeps one Python storage object per
    storage while it lives), with ``callback`` called when the storage goes: something kept
    for a parameter lives as long as its memory, and the tensor itself gets no weak reference
    (module docstring). None for a tensor without an accessible storage (a wrapper subclass or
    a ``torch.func`` transform's tensor): then keep nothing for it."""
    try:
        return weakref.ref(tensor.untyped_storage(), callback)
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def holds_memory_of(ref: weakref.ref, tensor: Tensor) -> bool:
    """Whether ``ref`` (:func:`memory_ref`) refers to ``tensor``'s storage."""
    try:
        return ref() is tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return False


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


def set_backward_update(weight: Tensor, update: Callable | None) -> None:
    """Register ``update`` as the optimizer step that ``weight``'s native Scaled-WS backward
    applies in place of writing its gradient, or drop it (``None``).

    The backward calls ``update(grad_rows, rows, mean, n_var, gain, eps, gamma, need_gain)``
    with the upstream gradient and the weight as contiguous ``(out, fan_in)`` rows (``rows``
    shares the weight's memory), the forward's per-unit ``mean`` and ``N·var``, the gain of
    the formula (or None), its constants, and whether the gain's gradient is wanted. It
    returns ``(applied, grad_gain)``: when ``applied`` the weight was updated (and gets no
    gradient), otherwise the backward writes the gradient as usual. The entry is dropped with
    the weight's memory (:func:`memory_ref`), so ``update`` must not hold the weight itself
    (:class:`normfree.optim.backward_update.BackwardUpdate` holds it through a weak reference
    to its own object)."""
    key = id(weight)
    if update is None:
        _BACKWARD_UPDATES.pop(key, None)
        return
    ref = memory_ref(weight, lambda _, key=key: _BACKWARD_UPDATES.pop(key, None))
    if ref is None:
        raise ValueError("a backward update needs a weight with its own storage")
    _BACKWARD_UPDATES[key] = (ref, update)


def backward_update(weight: Tensor) -> Callable | None:
    """The update registered for ``weight`` by :func:`set_backward_update`, or None."""
    entry = _BACKWARD_UPDATES.get(id(weight))
    if entry is None or not holds_memory_of(entry[0], weight):
        return None
    return entry[1]
