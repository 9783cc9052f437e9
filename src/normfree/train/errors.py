"""Exceptions that end a training run."""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "TrainingInterrupted"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf (and ``train.skip_nonfinite`` is off)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGINT: ``last.pt`` was written at the last completed step."""
