"""Hooks into the training loop, for code outside the library's config: progress reporting,
custom logging, and fault injection in tests (a NaN at a chosen step, a crash, a slow step).

A :class:`Callback` subclass overrides the hooks it needs and is passed as
``train(cfg, callbacks=[...])`` or ``Trainer(..., callbacks=[...])``. Hooks run on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from normfree.train.loop import Trainer

__all__ = ["Callback"]


class Callback:
    """Base class: every hook does nothing."""

    def on_loss(self, trainer: Trainer, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Called with the loss of each micro-batch of optimizer step ``step`` (1-based) before
        the backward pass; returns the loss to use."""
        return loss

    def on_step_end(self, trainer: Trainer) -> None:
        """Called after each optimizer step (``trainer.global_step`` steps done), after any
        periodic checkpoint of that step was written."""
