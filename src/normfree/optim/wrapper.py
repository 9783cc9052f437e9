"""Base class for optimizer wrappers that act on gradients or weights around an inner step.

A wrapper *is* a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` are
the inner optimizer's own objects, so LR schedulers, ``GradScaler`` (``scaler.step(wrapper)``
unscales first), checkpointing (``state_dict`` / ``load_state_dict`` are the inner optimizer's)
and further wrapping (``MeanShiftRejection(AGC(SGD(...)))``) all work unchanged. State-dict hooks
belong on the inner optimizer; step hooks may go on either.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

__all__ = ["OptimizerWrapper"]


class OptimizerWrapper(Optimizer):
    """Share an inner optimizer's state; subclasses override :meth:`before_step` (gradients are
    final: clip or project them) and :meth:`after_step` (the weights were just updated)."""

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        if isinstance(optimizer, type(self)):
            raise TypeError(f"optimizer is already wrapped in {type(self).__name__}")
        self.optimizer = optimizer
        # What Optimizer.__init__ sets, minus the parameter groups (shared with `optimizer`).
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._patch_step_function()

    # -- shared state ---------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> defaultdict:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: defaultdict) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._init_group(self.param_groups[-1])

    def _init_group(self, group: dict[str, Any]) -> None:
        """Fill wrapper-specific keys of a new param group (override)."""

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- stepping -------------------------------------------------------------------------------
    def before_step(self) -> None:
        """Called with the final gradients, right before the inner optimizer's update."""

    def after_step(self) -> None:
        """Called right after the inner optimizer's update."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """``before_step``, the inner step, ``after_step``. A closure is wrapped so that the
        gradients it produces pass through ``before_step`` before the inner optimizer uses them."""
        if closure is None:
            self.before_step()
            loss = self.optimizer.step()
        else:

            def wrapped_closure() -> Any:
                out = closure()
                self.before_step()
                return out

            loss = self.optimizer.step(wrapped_closure)
        self.after_step()
        return loss
