"""Exceptions that end a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["NonFiniteLossError", "RunAlreadyComplete", "TrainingInterrupted"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf (and ``train.skip_nonfinite`` is off)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGINT / SIGTERM: ``last.pt`` was written at the last completed step
    (``saved``), or, after a second signal or one inside a parameter update, left as the last
    checkpoint wrote it (``saved=False``)."""

    def __init__(
        self, message: str = "", saved: bool = True, run_dir: Path | None = None
    ) -> None:
        super().__init__(message)
        self.saved = saved
        self.run_dir = run_dir

    def resume_folder(self) -> Path | None:
        """The folder to pass to ``--resume``: the run's, or for its fine-tuning phase
        (``RUN/finetune``) the run's own, whose ``--resume`` continues that phase."""
        folder = self.run_dir
        parent_run = folder is not None and (folder.parent / "last.pt").is_file()
        if folder is not None and folder.name == "finetune" and parent_run:
            return folder.parent
        return folder


class RunAlreadyComplete(Exception):
    """``--resume`` of a run that has trained all its epochs: there is nothing to train, and
    nothing of the run folder was rewritten (its ``summary.json`` stays as it was).
    ``finetune_pending``: the run has a fine-tuning phase (``train.finetune_epochs``) that
    wrote no checkpoint yet; ``finetune_partial``: one whose last checkpoint has not trained
    all its epochs; ``config`` and ``model_args`` are the checkpoint's."""

    def __init__(
        self,
        message: str,
        run_dir: Path,
        config: Any = None,
        model_args: dict[str, Any] | None = None,
        finetune_pending: bool = False,
        finetune_partial: bool = False,
    ) -> None:
        super().__init__(message)
        self.run_dir, self.config, self.model_args = run_dir, config, model_args
        self.finetune_pending, self.finetune_partial = finetune_pending, finetune_partial
