"""Exceptions that end a training run."""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "SimulatedCrash", "TrainingInterrupted"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf (and ``train.skip_nonfinite`` is off)."""


class SimulatedCrash(RuntimeError):
    """Raised by ``debug.stop_after_steps`` to imitate a killed run (nothing is saved)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGINT: ``last.pt`` was written at the last completed step."""
