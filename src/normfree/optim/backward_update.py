"""The optimizer step of the Scaled-WS conv weights applied inside their backward, fused with
adaptive gradient clipping (Brock et al. 2021b, eq. 3), for ``torch.optim.SGD``, ``Adam`` and
``AdamW``.

A Scaled-WS conv's native backward (:mod:`normfree.nn.native`) computes ∂L/∂W one output unit
(one row of the weight) at a time. AGC clips per unit, and the optimizers update element by
element, so both can run on the row while it is still in cache: the row's gradient is computed,
clipped against ``clipping·max(‖W_o‖, eps)`` (‖W_o‖ from the forward's statistics) and applied
to the row of the weight and of the optimizer's state in place (``csrc/scaled_ws_update.h``).
No gradient is written for these weights and none is read back. For SGD with momentum a step
then moves 5 weight-sized streams through memory for them instead of 3 (backward) + 1 (AGC's
norms) + 8 (PyTorch's per-tensor SGD; 5 with its fused kernel), and for Adam 7 (9 with AMSGrad)
instead of 3 + 1 + 20 (PyTorch's per-tensor Adam; 7 with its fused kernel). On nf_resnet50 and
NFNet-F0 at b8 @128² on 2 CPU cores a training step takes 0.94–0.97× the time with the native
kernels alone with PyTorch's per-tensor SGD, 0.90× with its per-tensor AdamW and 0.97–1.00×
with its fused AdamW, and the conv-weight gradients (90 / 177 MiB) are never allocated
(docs/benchmarks.md, "Nineteenth pass" and "Twentieth pass").

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

* The update uses the weight's param group as it is at the backward (SGD: ``lr``,
  ``momentum``, ``dampening``, ``weight_decay``, ``nesterov``, ``maximize``; Adam/AdamW:
  ``lr``, ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize`` and whether the
  decay is decoupled; a schedule that changes ``lr`` after ``opt.step()`` acts on the next
  backward, as on the next step), and keeps the state where the optimizer does (SGD's
  ``opt.state[w]["momentum_buffer"]``; Adam's ``step``, ``exp_avg``, ``exp_avg_sq`` and
  ``max_exp_avg_sq``), so ``state_dict`` and resuming are unchanged. The numbers equal those
  of AGC followed by ``opt.step()`` to rounding (a tensor-valued ``lr`` or ``betas`` is read
  as a Python float, so the bias corrections are computed in double precision where PyTorch
  computes them in the tensor's dtype). ``differentiable`` and ``capturable`` groups are
  refused, also when they appear later (before the next step's first update).
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
  one), a Mean Shift Rejection or an AGC other than ``agc`` attached to the optimizer, and
  weights that another live update (of another optimizer, or an earlier call) already steps.
  ``agc.remove()`` stops the clipping of these weights too, from the next backward on.
* **Not detected**: ``GradScaler`` (its scaled gradients would be applied as they are) and
  ``clip_grad_norm_`` (it would leave these weights out). Do not combine them with this.
* Every backward that would accumulate these weights' gradients into ``.grad`` applies the
  step: call :meth:`BackwardUpdate.remove` before a ``.backward()`` for anything but a
  training step. One that would not (``torch.autograd.grad``, which returns the gradients,
  or ``backward(inputs=...)`` without the weight) takes the plain backward and moves no
  weight. The optimizer's step hooks hold the update, so it ends with the optimizer (the
  returned handle need not be kept).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor, nn

from normfree.nn import native
from normfree.nn.param_updates import set_backward_update
from normfree.nn.ws import ScaledStdConv2d
from normfree.optim.agc import AGC
from normfree.optim.hooks import attached, before_step_hook

__all__ = ["BackwardUpdate", "update_in_backward"]

_DTYPES = (torch.float32, torch.float64)
_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _fits(state: Tensor, weight: Tensor) -> bool:
    """Whether an optimizer state tensor can be updated in place as the weight's rows."""
    return (
        state.is_contiguous()
        and state.shape == weight.shape
        and state.dtype == weight.dtype
        and state.device == weight.device
    )


def _unsupported_flag(optimizer: torch.optim.Optimizer) -> str | None:
    """The first param-group flag the kernels do not implement that a group has set."""
    for group in optimizer.param_groups:
        for flag in ("differentiable", "capturable"):
            if group.get(flag, False):
                return flag
    return None


def _adam_step_dtype(group: dict) -> torch.dtype:
    """The dtype of the step count that ``torch.optim.Adam`` makes for a new state (torch 2.x):
    float32 for its fused kernel, otherwise float64 under a float64 default dtype, else
    float32."""
    if group.get("fused"):
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _accumulator(weight: Tensor) -> object | None:
    """The autograd node that accumulates ``weight``'s gradient into ``.grad`` (public
    ``get_gradient_edge``), or None where this PyTorch cannot be asked whether a backward
    runs it (:func:`_accumulates`). Kept per weight: looking it up costs ~8 µs."""
    edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    if edge is None or not hasattr(torch._C, "_will_engine_execute_node"):
        return None
    return edge(weight).node


def _accumulates(node: object | None) -> bool:
    """Whether the running backward runs ``node`` (:func:`_accumulator`), i.e. accumulates the
    weight's gradient into ``.grad``: not a ``torch.autograd.grad`` that returns it (PyTorch
    refuses the question for a leaf that it captures) nor a ``backward(inputs=...)`` that
    leaves the weight out. Asked through the engine's private query that
    ``torch.autograd.graph.register_multi_grad_hook`` uses (no public one exists); True where
    a PyTorch release lacks it."""
    if node is None:
        return True
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # torch.autograd.grad capturing this leaf's gradient
        return False


# the BackwardUpdates not removed (each lives as long as its optimizer, whose hooks hold it)
_LIVE: weakref.WeakSet[BackwardUpdate] = weakref.WeakSet()


def _owner(weights: dict[int, Tensor]) -> BackwardUpdate | None:
    """A live, not removed BackwardUpdate that already updates one of ``weights``."""
    for handle in list(_LIVE):
        if handle._hooks and any(handle._weights.get(k) is w for k, w in weights.items()):
            return handle
    return None


def _refuse_a_second_owner(weights: dict[int, Tensor]) -> None:
    """Refuse weights that another optimizer's update already steps in their backward: the
    newest would win silently, and the older optimizer would apply the newer one's step. An
    optimizer dropped but not yet collected (a notebook cell run again) is collected first."""
    if _owner(weights) is None:
        return
    gc.collect()  # the optimizer and its update hold each other: only the collector frees them
    other = _owner(weights)
    if other is not None:
        raise ValueError(
            f"these weights are already updated in the backward by {other!r} of another "
            "optimizer (or an earlier call on this one): call remove() on that handle, or drop "
            "every reference to that optimizer, first"
        )


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
        if type(optimizer) not in _OPTIMIZERS:
            raise TypeError(
                "update_in_backward applies the step of torch.optim.SGD, Adam or AdamW; got "
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
        flag = _unsupported_flag(optimizer)
        if flag is not None:
            raise ValueError(f"update_in_backward does not support {flag}=True")
        if _processes() > 1:
            raise ValueError(
                "update_in_backward needs one process: with several, the gradients must be "
                "all-reduced before the update"
            )
        self.optimizer, self.agc = optimizer, agc
        self._agc_attached = agc is not None  # whether agc still clips: read at each step
        # by type: before torch 2.7, AdamW was no subclass of Adam
        self._step = self._sgd if type(optimizer) is torch.optim.SGD else self._adam
        self._decoupled = type(optimizer) is torch.optim.AdamW
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
        _refuse_a_second_owner(self._weights)
        self._updated: set[int] = set()  # weights updated since the last optimizer step
        self._where: dict[int, tuple[int, int]] = {}  # id(weight) → (group, place) last found
        # id(weight) → its gradient accumulator, found at its first backward (_accumulates)
        self._accumulators: dict[int, object | None] = {}
        self._hooks = [
            # after a closure passed to step(), which runs the backward inside the step
            optimizer.register_step_pre_hook(before_step_hook(self._check_before_step)),
            optimizer.register_step_post_hook(self._after_step),
        ]
        for weight in self._weights.values():
            set_backward_update(weight, self._updater(weight))
        _LIVE.add(self)

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
        if agc is None or not self._agc_attached or id(weight) in agc.excluded_ids:
            return 0.0  # (an AGC detached by its remove() clips no gradient, these neither)
        clipping = group.get("clipping", agc.clipping)
        if clipping is None:
            return 0.0  # the kernel's "no clipping"
        if not float(clipping) > 0.0:
            raise RuntimeError(f"AGC clipping must be > 0 for update_in_backward, got {clipping}")
        return float(clipping)

    def _updater(self, weight: Tensor) -> Callable[..., tuple[bool, Tensor | None]]:
        # a weak reference to this object only (which holds the weight): the registry of
        # normfree.nn.param_updates holds this function for as long as the weight's memory
        # lives, and this object lives as long as the optimizer whose hooks hold it; once that
        # is gone, the backward writes the gradient again
        owner, key = weakref.ref(self), id(weight)

        def update(*args) -> tuple[bool, Tensor | None]:
            handle = owner()
            if handle is None or key not in handle._weights:
                return False, None
            return handle._apply(handle._weights[key], *args)

        return update

    def _apply(
        self, weight: Tensor, grad_rows: Tensor, rows: Tensor, mean: Tensor, n_var: Tensor,
        gain: Tensor | None, eps: float, gamma: float, need_gain: bool,
    ) -> tuple[bool, Tensor | None]:  # fmt: skip
        """The step for ``weight`` in its backward (the protocol of
        :func:`normfree.nn.param_updates.set_backward_update`)."""
        key = id(weight)
        if key not in self._accumulators:
            self._accumulators[key] = _accumulator(weight)
        if not _accumulates(self._accumulators[key]):  # returned, or not asked for: no step
            return False, None
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
            self._check_before_update()
        group = self._group(weight)
        clipping = self._clipping(weight, group)
        agc = (clipping, self.agc.eps if self.agc is not None else 0.0)
        applied, grad_gain = self._step(ext, weight, group, (grad_rows, rows, mean, n_var, gain),
                                        (eps, gamma, need_gain), agc)  # fmt: skip
        if applied:
            torch.autograd.graph.increment_version(weight)
            self._updated.add(key)
        return applied, grad_gain

    def _sgd(
        self, ext: ModuleType, weight: Tensor, group: dict, tensors: tuple, ws: tuple, agc: tuple
    ) -> tuple[bool, Tensor | None]:
        """``torch.optim.SGD``'s step in the backward, as :meth:`_apply` returns it: not
        applied where the momentum buffer is not one the kernel can update in place."""
        momentum = float(group["momentum"])
        buffer = fresh = None
        dampening = float(group["dampening"])
        if momentum != 0.0:  # (optimizer.state makes an entry when asked: SGD keeps none without)
            buffer = self.optimizer.state[weight].get("momentum_buffer")
            if buffer is None:  # SGD's first step: the buffer is the gradient itself
                buffer = fresh = torch.zeros_like(weight, memory_format=torch.contiguous_format)
                dampening = 0.0
            elif not _fits(buffer, weight):
                return False, None
        grad_gain = ext.scaled_ws_backward_sgd(
            *tensors, None if buffer is None else buffer.view(tensors[1].shape), *ws,
            float(group["lr"]), momentum, dampening, float(group["weight_decay"]),
            bool(group["nesterov"]), bool(group.get("maximize", False)), *agc,
        )  # fmt: skip
        if fresh is not None:
            self.optimizer.state[weight]["momentum_buffer"] = fresh
        return True, grad_gain

    def _adam(
        self, ext: ModuleType, weight: Tensor, group: dict, tensors: tuple, ws: tuple, agc: tuple
    ) -> tuple[bool, Tensor | None]:
        """``torch.optim.Adam``'s or ``AdamW``'s step in the backward, with the step count and
        moments kept in the optimizer's state as Adam keeps them, as :meth:`_apply` returns
        it: not applied where the state is not one the kernel can update in place."""
        state = self.optimizer.state[weight]
        names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        fresh = None
        if len(state) == 0:  # Adam's lazy initialization, as its first step would make it
            fresh = {"step": torch.tensor(0.0, dtype=_adam_step_dtype(group))}
            for name in names:
                fresh[name] = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        moments = fresh if fresh is not None else state
        if "step" not in moments or not all(
            name in moments and _fits(moments[name], weight) for name in names
        ):
            return False, None  # optimizer.step() takes it (and says what is missing)
        t = float(moments["step"]) + 1.0
        lr, (beta1, beta2) = float(group["lr"]), (float(b) for b in group["betas"])
        shape = tensors[1].shape
        grad_gain = ext.scaled_ws_backward_adam(
            *tensors, moments["exp_avg"].view(shape), moments["exp_avg_sq"].view(shape),
            moments["max_exp_avg_sq"].view(shape) if group["amsgrad"] else None, *ws,
            lr, beta1, beta2, float(group["eps"]), float(group["weight_decay"]),
            bool(group.get("decoupled_weight_decay", self._decoupled)),
            bool(group.get("maximize", False)),
            lr / (1.0 - beta1**t), (1.0 - beta2**t) ** 0.5, *agc,
        )  # fmt: skip
        moments["step"] += 1
        if fresh is not None:
            state.update(fresh)
        return True, grad_gain

    def _check_before_update(self) -> None:
        """Refuse, before any weight of a step moves, what has changed since this update began
        that it cannot serve: a param group flag it does not implement (set by hand or by
        ``load_state_dict``), and step actions attached to the optimizer that would act on
        gradients these weights never get; and note whether ``agc`` still clips (its
        ``remove()`` detaches it from every parameter, these weights included)."""
        flag = _unsupported_flag(self.optimizer)
        if flag is not None:
            raise RuntimeError(
                f"a param group has {flag}=True, which update_in_backward does not support; "
                "remove() the BackwardUpdate first"
            )
        actions = attached(self.optimizer)
        for action in actions:
            if action is not self.agc:
                raise RuntimeError(
                    f"{type(action).__name__} was attached to the optimizer after "
                    "update_in_backward: it acts on gradients that the weights updated in the "
                    "backward never get; remove() the BackwardUpdate first"
                )
        self._agc_attached = any(action is self.agc for action in actions)

    def _check_before_step(self) -> None:
        """Refuse a step that would update a weight a second time: one updated in the
        backward that has also received a gradient (from another use in the graph)."""
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
    """Apply ``optimizer``'s step (``torch.optim.SGD``, ``Adam`` or ``AdamW``; not a subclass,
    whose step may differ) to ``model``'s Scaled-WS conv weights inside their native backward,
    clipped by ``agc`` (the :class:`~normfree.optim.AGC` attached to ``optimizer``, if any),
    instead of writing their gradients (module docstring). Returns the
    :class:`BackwardUpdate`; its :meth:`~BackwardUpdate.remove` restores the plain path."""
    return BackwardUpdate(optimizer, model, agc=agc)
