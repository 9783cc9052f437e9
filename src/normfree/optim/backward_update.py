"""The optimizer step of the Scaled-WS conv weights applied inside their backward, fused with
adaptive gradient clipping (Brock et al. 2021b, eq. 3), for ``torch.optim.SGD``.

A Scaled-WS conv's native backward (:mod:`normfree.nn.native`) computes ∂L/∂W one output unit
(one row of the weight) at a time. AGC clips per unit, and SGD updates element by element, so
both can run on the row while it is still in cache: the row's gradient is computed, clipped
against ``clipping·max(‖W_o‖, eps)`` (‖W_o‖ from the forward's statistics) and applied to the
row of the weight and of its momentum buffer in place. No gradient is written for these weights
and none is read back, so a step moves 5 weight-sized streams through memory for them instead
of 3 (backward) + 1 (AGC's norms) + 8 (PyTorch's per-tensor SGD). On nf_resnet50 and NFNet-F0
at b8 @128² on 2 CPU cores a training step takes 0.94–0.97× the time with the native kernels
alone, and the conv-weight gradients (90 / 177 MiB) are never allocated (docs/benchmarks.md,
"Nineteenth pass").

This is PyTorch's optimizer-in-backward pattern, so it holds only for one backward per
optimizer step::

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    agc = normfree.optim.attach_agc(opt, clipping=0.01, model=model)
    fused = normfree.optim.update_in_backward(opt, model, agc=agc)
    with normfree.nn.native_kernels(True):
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()  # updates the Scaled-WS conv weights
            opt.step()  # clips and updates every other parameter

Rules:

* The update uses the weight's param group as it is at the backward (``lr``, ``momentum``,
  ``dampening``, ``weight_decay``, ``nesterov``, ``maximize``; a schedule that changes ``lr``
  after ``opt.step()`` acts on the next backward, as on the next step), and keeps its momentum
  buffer where SGD does (``opt.state[w]["momentum_buffer"]``), so ``state_dict`` and resuming
  are unchanged. The numbers equal those of AGC followed by ``opt.step()`` to rounding.
* It runs where the native Scaled-WS kernels run (eager CPU, float32/float64, a contiguous
  weight). Elsewhere the gradient is written and ``opt.step()`` updates the weight as usual.
* One backward per step. A second backward through an updated weight before ``opt.step()``
  raises (gradient accumulation needs the plain path). A weight that already holds a gradient
  is left to the optimizer.
* A weight used twice in one graph (shared by two convs, or also read by another term of the
  loss) is refused, but only once the first of its uses has been updated: autograd refuses
  the weight it saved, or ``opt.step()`` refuses the late gradient. The weights are then
  partly updated; restore them from a checkpoint.
* Refused when the update starts: several processes (``torch.distributed`` with more than
  one), and a Mean Shift Rejection or an AGC other than ``agc`` attached to the optimizer.
* **Not detected**: ``GradScaler`` (its scaled gradients would be applied as they are) and
  ``clip_grad_norm_`` (it would leave these weights out). Do not combine them with this.
* Every backward that reaches these weights' Scaled-WS nodes applies the step, including a
  ``torch.autograd.grad`` for the convs' gains: call :meth:`BackwardUpdate.remove` before
  taking gradients for anything but a training step. The optimizer's step hooks hold the
  update, so it ends with the optimizer (the returned handle need not be kept).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from normfree.nn import native
from normfree.nn.param_updates import set_backward_update
from normfree.nn.ws import ScaledStdConv2d
from normfree.optim.agc import AGC
from normfree.optim.hooks import attached

__all__ = ["BackwardUpdate", "update_in_backward"]

_DTYPES = (torch.float32, torch.float64)


def _processes() -> int:
    """The number of processes of ``torch.distributed``'s default group (1 without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class BackwardUpdate:
    """The Scaled-WS conv weights of ``model`` updated inside their backward (module
    docstring); :func:`update_in_backward` builds it. :meth:`remove` restores the plain path.

    Attributes:
        weights: the names of the weights updated in the backward.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, agc: AGC | None = None
    ) -> None:
        if type(optimizer) is not torch.optim.SGD:
            raise TypeError(
                "update_in_backward applies torch.optim.SGD's step; got "
                f"{type(optimizer).__name__}: use the plain path (no update_in_backward)"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if agc is not None and agc.optimizer is not optimizer:
            raise ValueError("agc must be attached to the same optimizer")
        for action in attached(optimizer):
            if not isinstance(action, AGC):
                raise ValueError(
                    f"update_in_backward cannot run with {type(action).__name__} attached to "
                    "the optimizer: it acts on the gradients, which these weights never get"
                )
            if agc is None:
                raise ValueError(
                    "an AGC is attached to the optimizer: pass it as agc= so that the weights "
                    "updated in the backward are clipped too"
                )
        for group in optimizer.param_groups:
            if group.get("differentiable", False):
                raise ValueError("update_in_backward does not support differentiable=True")
        if _processes() > 1:
            raise ValueError(
                "update_in_backward needs one process: with several, the gradients must be "
                "all-reduced before the update"
            )
        self.optimizer, self.agc = optimizer, agc
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._weights: dict[int, Tensor] = {}
        self.weights: list[str] = []
        for name, module in model.named_modules():
            if isinstance(module, ScaledStdConv2d) and id(module.weight) in in_optimizer:
                weight = module.weight
                if weight.dtype in _DTYPES and id(weight) not in self._weights:
                    self._weights[id(weight)] = weight
                    self.weights.append(f"{name}.weight" if name else "weight")
        if not self._weights:
            raise ValueError(
                "no float32/float64 Scaled-WS conv weight of the model is in the optimizer"
            )
        self._updated: set[int] = set()  # weights updated since the last optimizer step
        self._where: dict[int, tuple[int, int]] = {}  # id(weight) → (group, place) last found
        self._hooks = [
            optimizer.register_step_pre_hook(self._check_before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        for weight in self._weights.values():
            set_backward_update(weight, self._updater(weight))

    def __repr__(self) -> str:
        return f"BackwardUpdate({len(self.weights)} weights, agc={self.agc is not None})"

    def remove(self) -> None:
        """Stop updating in the backward: the weights get gradients again."""
        for weight in self._weights.values():
            set_backward_update(weight, None)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _group(self, weight: Tensor) -> dict:
        # where the weight was last found, checked at each backward: load_state_dict replaces
        # the group dicts (and keeps the parameters' places)
        groups = self.optimizer.param_groups
        where = self._where.get(id(weight))
        if where is not None and where[0] < len(groups):
            params = groups[where[0]]["params"]
            if where[1] < len(params) and params[where[1]] is weight:
                return groups[where[0]]
        for k, group in enumerate(groups):
            for j, p in enumerate(group["params"]):
                if p is weight:
                    self._where[id(weight)] = (k, j)
                    return group
        raise RuntimeError(
            "a weight updated in the backward is no longer in the optimizer; call remove() "
            "on the BackwardUpdate before changing the optimizer's parameters"
        )

    def _clipping(self, weight: Tensor, group: dict) -> float:
        agc = self.agc
        if agc is None or id(weight) in agc.excluded_ids:
            return 0.0
        clipping = group.get("clipping", agc.clipping)
        if clipping is None:
            return 0.0  # the kernel's "no clipping"
        if not float(clipping) > 0.0:
            raise RuntimeError(f"AGC clipping must be > 0 for update_in_backward, got {clipping}")
        return float(clipping)

    def _updater(self, weight: Tensor) -> Callable[..., tuple[bool, Tensor | None]]:
        # weak references only: the registry of normfree.nn.param_updates holds this function
        # for as long as the weight lives, and this object lives as long as the optimizer whose
        # hooks hold it; once that is gone, the backward writes the gradient again
        owner, target = weakref.ref(self), weakref.ref(weight)

        def update(*args) -> tuple[bool, Tensor | None]:
            handle, w = owner(), target()
            if handle is None or w is None:
                return False, None
            return handle._apply(w, *args)

        return update

    def _apply(
        self, weight: Tensor, grad_rows: Tensor, rows: Tensor, mean: Tensor, n_var: Tensor,
        gain: Tensor | None, eps: float, gamma: float, need_gain: bool,
    ) -> tuple[bool, Tensor | None]:  # fmt: skip
        """The step for ``weight`` in its backward (the protocol of
        :func:`normfree.nn.param_updates.set_backward_update`)."""
        key = id(weight)
        if key in self._updated:
            raise RuntimeError(
                "a second backward through a weight that update_in_backward already updated "
                "in this step (gradient accumulation, or the weight used twice): call "
                "optimizer.step() after each backward, or remove() the BackwardUpdate"
            )
        ext = native.extension("scaled_ws")
        if ext is None or weight.grad is not None or not weight.is_contiguous():
            return False, None  # the gradient is written; optimizer.step() applies it
        if not self._updated:  # the first weight of this step
            self._check_attached()
        group = self._group(weight)
        momentum = float(group["momentum"])
        buffer = fresh = None
        dampening = float(group["dampening"])
        if momentum != 0.0:  # (optimizer.state makes an entry when asked: SGD keeps none without)
            buffer = self.optimizer.state[weight].get("momentum_buffer")
            if buffer is None:  # SGD's first step: the buffer is the gradient itself
                buffer = fresh = torch.zeros_like(weight, memory_format=torch.contiguous_format)
                dampening = 0.0
            elif not buffer.is_contiguous() or buffer.shape != weight.shape:
                return False, None
        clipping = self._clipping(weight, group)
        agc_eps = self.agc.eps if self.agc is not None else 0.0
        grad_gain = ext.scaled_ws_backward_sgd(
            grad_rows, rows, mean, n_var, gain, None if buffer is None else buffer.view(rows.shape),
            eps, gamma, need_gain, float(group["lr"]), momentum, dampening,
            float(group["weight_decay"]), bool(group["nesterov"]),
            bool(group.get("maximize", False)), clipping, agc_eps,
        )  # fmt: skip
        if fresh is not None:
            self.optimizer.state[weight]["momentum_buffer"] = fresh
        torch.autograd.graph.increment_version(weight)
        self._updated.add(key)
        return True, grad_gain

    def _check_attached(self) -> None:
        """Refuse, before any weight moves, the step actions attached to the optimizer since
        this update began that would act on gradients these weights never get."""
        for action in attached(self.optimizer):
            if action is not self.agc:
                raise RuntimeError(
                    f"{type(action).__name__} was attached to the optimizer after "
                    "update_in_backward: it acts on gradients that the weights updated in the "
                    "backward never get; remove() the BackwardUpdate first"
                )

    def _check_before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict
    ) -> None:
        for key in self._updated:
            if self._weights[key].grad is not None:
                raise RuntimeError(
                    "a weight that update_in_backward updated in the backward has received a "
                    "gradient from another use in the graph; it cannot be updated twice in one "
                    "step: remove() the BackwardUpdate for this model"
                )

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._updated.clear()


def update_in_backward(
    optimizer: torch.optim.Optimizer, model: nn.Module, agc: AGC | None = None
) -> BackwardUpdate:
    """Apply ``optimizer``'s step (``torch.optim.SGD``) to ``model``'s Scaled-WS conv weights
    inside their native backward, clipped by ``agc`` (the :class:`~normfree.optim.AGC` attached
    to ``optimizer``, if any), instead of writing their gradients (module docstring). Returns
    the :class:`BackwardUpdate`; its :meth:`~BackwardUpdate.remove` restores the plain path."""
    return BackwardUpdate(optimizer, model, agc=agc)
