"""Exceptions that end a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["NonFiniteLossError", "RunAlreadyComplete", "TrainingInterrupted"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf (and ``train.skip_nonfinite`` is off)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGINT: ``last.pt`` was written at the last completed step."""


class RunAlreadyComplete(Exception):
    """``--resume`` of a run that has trained all its epochs: there is nothing to train, and
    nothing of the run folder was rewritten (its ``summary.json`` stays as it was).
    ``finetune_pending``: the run has a fine-tuning phase (``train.finetune_epochs``) that
    never started; ``config`` and ``model_args`` are the checkpoint's."""

    def __init__(
        self,
        message: str,
        run_dir: Path,
        config: Any = None,
        model_args: dict[str, Any] | None = None,
        finetune_pending: bool = False,
    ) -> None:
        super().__init__(message)
        self.run_dir, self.config, self.model_args = run_dir, config, model_args
        self.finetune_pending = finetune_pending
