"""Gradient and weight actions attached to any optimizer through PyTorch's public step hooks.

``Optimizer.register_step_pre_hook`` runs ``hook(optimizer, args, kwargs)`` right before every
``optimizer.step(*args, **kwargs)`` (and may return replacement ``(args, kwargs)``);
``register_step_post_hook`` runs one right after. AGC (clip the final gradients) and Mean Shift
Rejection (project the gradients, or re-project the weights after the update) are exactly such
"before the step" / "after the step" actions, so they need no optimizer subclass: the user's
optimizer stays the object that schedulers, ``GradScaler`` and checkpoints see.

A closure passed to ``step`` (``LBFGS``, or ``opt.step(closure)`` with any optimizer) computes
the gradients *inside* the step; the pre-hook therefore wraps it so that the action runs on the
gradients the closure has just produced.

Hooks belong to one optimizer object: ``copy.deepcopy(optimizer)`` copies the hook functions,
which still act on the original's parameter groups, so attach AGC / MSR to a copy anew.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

__all__ = ["after_step_hook", "attached", "before_step_hook", "record_attached"]

# optimizer -> the AGC / MeanShiftRejection objects attached to it (weak: dies with it)
_ATTACHED: weakref.WeakKeyDictionary[Optimizer, list[Any]] = weakref.WeakKeyDictionary()


def record_attached(optimizer: Optimizer, action: Any, attached_now: bool = True) -> None:
    """Remember (or, with ``attached_now=False``, forget) that ``action`` hooks ``optimizer``."""
    actions = _ATTACHED.setdefault(optimizer, [])
    if attached_now:
        actions.append(action)
    elif action in actions:
        actions.remove(action)


def attached(optimizer: Optimizer) -> list[Any]:
    """The AGC / Mean Shift Rejection objects currently attached to ``optimizer``, in the
    order their hooks run."""
    return list(_ATTACHED.get(optimizer, []))

StepHook = Callable[[Optimizer, tuple[Any, ...], dict[str, Any]], Any]


def before_step_hook(action: Callable[[], None]) -> StepHook:
    """A step pre-hook running ``action()`` on the final gradients: right away without a closure,
    otherwise after the (wrapped) closure has computed them."""

    def hook(optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # PyTorch passes step's positional arguments with the optimizer itself first
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            action()
            return None

        def closure_then_action() -> Any:
            out = closure()
            action()
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_action}
        return (args[0], closure_then_action, *args[2:]), kwargs

    return hook


def after_step_hook(action: Callable[[], None]) -> StepHook:
    """A step post-hook running ``action()`` once the update is done."""

    def hook(optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        action()

    return hook
