"""Fault injection for the training tests, from outside the library's config: callbacks for
in-process runs, and ``faulty_normfree.py`` (this folder) for subprocess runs, which reads the
``NORMFREE_TEST_FAULTS`` environment variable (``crash_after=7,sleep=0.25,nan_at=5``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from normfree.train import Callback, Trainer

ENV = "NORMFREE_TEST_FAULTS"
FAULTY_CLI = str(Path(__file__).with_name("faulty_normfree.py"))


class InjectedCrash(RuntimeError):
    """An in-process stand-in for a killed run (nothing is saved when it is raised)."""


class CrashAfter(Callback):
    """After optimizer step ``steps``: raise :class:`InjectedCrash`, or with ``hard`` end the
    process at once with exit code 3 (``os._exit``: no cleanup, no final checkpoint)."""

    def __init__(self, steps: int, hard: bool = False) -> None:
        self.steps, self.hard = steps, hard

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.global_step == self.steps:
            if self.hard:
                print(f"simulated crash after step {self.steps}", file=sys.stderr, flush=True)
                os._exit(3)
            raise InjectedCrash(f"simulated crash after step {self.steps}")


class NaNAt(Callback):
    """Make the loss NaN at optimizer step ``step`` (1-based)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_loss(self, trainer: Trainer, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step == self.step else loss


class SleepEachStep(Callback):
    """Sleep after every step, so that a test can interrupt a run at a known pace."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, trainer: Trainer) -> None:
        time.sleep(self.seconds)


def callbacks_from_env() -> list[Callback]:
    """The callbacks ``NORMFREE_TEST_FAULTS`` asks for (subprocess crashes are hard)."""
    out: list[Callback] = []
    for item in filter(None, os.environ.get(ENV, "").split(",")):
        key, _, value = item.partition("=")
        if key == "crash_after":
            out.append(CrashAfter(int(value), hard=True))
        elif key == "nan_at":
            out.append(NaNAt(int(value)))
        elif key == "sleep":
            out.append(SleepEachStep(float(value)))
        else:
            raise ValueError(f"{ENV}: unknown fault {item!r}")
    return out
