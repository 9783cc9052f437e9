"""Exponential moving average of a model's weights, with the NFNet warmup.

The NFNet recipe (Brock et al. 2021b, App. C; DeepMind ``utils.tf1_ema``) keeps an EMA of all
parameters *and* state and evaluates it next to the raw weights. The decay warms up as::

    decay_t = min(decay, (1 + t) / (10 + t))
    ema ← decay_t · ema + (1 − decay_t) · θ

where ``t`` counts previous updates (0 at the first), so early averages are not dominated by the
random initialisation. Floating-point buffers (BatchNorm running statistics) are averaged the
same way; integer buffers (``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from normfree.console import name_list
from normfree.nn.wrappers import unwrap_model

__all__ = ["ModelEMA", "ema_decay"]


def ema_decay(decay: float, step: int, warmup: bool = True) -> float:
    """Decay used for update number ``step`` (0-based): ``min(decay, (1+t)/(10+t))`` with
    warmup, else ``decay``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be a number in [0, 1], got {decay!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"EMA step must be an int >= 0, got {step!r}")
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


class ModelEMA:
    """An EMA copy of ``model`` (``self.module``, always in eval mode, no gradients).

    Args:
        model: the model to average (DDP / compiled wrappers are unwrapped).
        decay: the target decay (0.99999 in the NFNet ImageNet runs).
        warmup: use the ``(1+t)/(10+t)`` warmup.
        device: keep the copy on another device (e.g. ``"cpu"`` to save accelerator memory).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        warmup: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        ema_decay(decay, 0)  # validates
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        if device is not None:
            self.module.to(device)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the current weights of ``model`` into the average; returns the decay used."""
        d = ema_decay(self.decay, self.num_updates, self.warmup)
        src = unwrap_model(model).state_dict()
        averaged = self.module.state_dict()
        if src.keys() != averaged.keys():
            missing = [n for n in averaged if n not in src]
            extra = [n for n in src if n not in averaged]
            raise ValueError(
                f"EMA: the model is not the one this average was made from (missing "
                f"{name_list(missing, 5) or 'none'}, unexpected {name_list(extra, 5) or 'none'}); "
                "update with that model"
            )
        for name, ema_t in averaged.items():  # all checked before any is averaged
            if src[name].shape != ema_t.shape:
                raise ValueError(
                    f"EMA: {name!r} is {tuple(src[name].shape)} in the model but "
                    f"{tuple(ema_t.shape)} in the average; update with the model it was made from"
                )
        for name, ema_t in averaged.items():
            new = src[name].detach().to(ema_t.device)
            if ema_t.is_floating_point() or ema_t.is_complex():
                ema_t.mul_(d).add_(new.to(ema_t.dtype), alpha=1.0 - d)
            else:
                ema_t.copy_(new)
        self.num_updates += 1
        return d

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """``{"module": weights, "num_updates": t, "decay": d, "warmup": w}``."""
        return {
            "module": self.module.state_dict(),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:
        missing = {"module", "num_updates"} - set(state)
        if missing:
            raise KeyError(f"EMA state is missing {sorted(missing)}")
        self.num_updates = int(state["num_updates"])
        self.decay = float(state.get("decay", self.decay))
        self.warmup = bool(state.get("warmup", self.warmup))
        return self.module.load_state_dict(state["module"], strict=strict)
