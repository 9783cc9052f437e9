"""Per-step learning-rate schedules: linear warmup, then cosine (or linear, exponential or
constant) decay.

The NFNet recipe (Brock et al. 2021b, App. C; DeepMind ``optim.WarmupCosineDecay``) warms the
learning rate up linearly from 0 to the peak over the first epochs and then decays it with a
half cosine to the final value at the last step::

    lr(t) = peak · t / W                                            t < W
    lr(t) = final + (peak − final) · ½(1 + cos(π · (t − W) / (T − W)))   W ≤ t ≤ T

with ``W`` warmup steps and ``T`` total steps (clamped at ``T``). The peak is ``0.1 · batch/256``
in the paper (:func:`scaled_peak_lr`). :class:`WarmupDecayLR` applies the *factor*
``lr(t)/peak`` to each parameter group's own base lr, so groups with an lr multiplier
(Fixup's scalars at lr/10) keep their ratio throughout.

``"exponential"`` is the EfficientNet schedule (Tan & Le 2019's TPU code; Masters et al. 2021
decay at rate 0.97): ``lr(t) = peak · rate^⌊t / P⌋`` with ``P`` steps per period, counted from
step 0 as ``tf.train.exponential_decay(..., staircase=True)`` is there, so the lr after warmup
starts at ``rate^⌊W / P⌋`` of the peak; it never goes below ``final · peak``.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["DECAYS", "WarmupDecayLR", "lr_factor", "scaled_peak_lr", "warmup_cosine_lr"]

DECAYS = ("cosine", "linear", "constant", "exponential")


def scaled_peak_lr(base_lr: float, batch_size: int, reference_batch: int = 256) -> float:
    """Linear batch-size scaling of the peak learning rate: ``base_lr · batch/256``
    (Goyal et al. 2017; the NFNet recipe uses ``0.1 · batch/256``, Brock et al. 2021b)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if reference_batch <= 0:
        raise ValueError(f"reference_batch must be positive, got {reference_batch}")
    return base_lr * batch_size / reference_batch


def _check(warmup_steps: int, total_steps: int, final_ratio: float, decay: str,
           decay_rate: float = 0.97, decay_steps: int | None = None) -> None:  # fmt: skip
    counts = [("warmup_steps", warmup_steps), ("total_steps", total_steps)]
    if decay == "exponential":
        if decay_steps is None:
            raise ValueError("exponential decay needs decay_steps (the steps of one period)")
        counts.append(("decay_steps", decay_steps))
    for name, value in counts:
        try:
            operator.index(value)  # ints of any kind (numpy's too), never 5.5
        except TypeError:
            raise TypeError(f"{name} must be an int (a count of steps), got {value!r}") from None
        if isinstance(value, bool):
            raise TypeError(f"{name} must be an int (a count of steps), got {value!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if decay == "exponential":
        if not 0.0 < decay_rate <= 1.0:
            raise ValueError(f"decay_rate must be in (0, 1], got {decay_rate}")
        if decay_steps is not None and decay_steps <= 0:
            raise ValueError(f"decay_steps must be positive, got {decay_steps}")


def lr_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    final_ratio: float = 0.0,
    decay: str = "cosine",
    decay_rate: float = 0.97,
    decay_steps: int | None = None,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warmup ``step / warmup_steps`` for ``step < warmup_steps``; afterwards ``decay``:
    ``"cosine"`` (half cosine from 1 to ``final_ratio`` at ``total_steps``), ``"linear"``,
    ``"exponential"`` (``decay_rate^⌊step / decay_steps⌋``, at least ``final_ratio``; see the
    module docstring) or ``"constant"`` (stays at 1). Steps beyond ``total_steps`` keep the
    final value.
    """
    _check(warmup_steps, total_steps, final_ratio, decay, decay_rate, decay_steps)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return step / warmup_steps
    if decay == "constant":
        return 1.0
    if decay == "exponential":
        assert decay_steps is not None  # (checked)
        return max(final_ratio, decay_rate ** (min(step, total_steps) // decay_steps))
    span = total_steps - warmup_steps
    progress = 1.0 if span == 0 else min(step - warmup_steps, span) / span
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return final_ratio + (1.0 - final_ratio) * shape


def warmup_cosine_lr(
    step: int, peak_lr: float, warmup_steps: int, total_steps: int, final_lr: float = 0.0
) -> float:
    """The NFNet schedule's learning rate at ``step`` (see the module docstring)."""
    if peak_lr <= 0:
        raise ValueError(f"peak_lr must be positive, got {peak_lr}")
    if not 0.0 <= final_lr <= peak_lr:
        raise ValueError(f"final_lr must be in [0, peak_lr = {peak_lr}], got {final_lr}")
    ratio = final_lr / peak_lr
    return peak_lr * lr_factor(step, warmup_steps, total_steps, ratio, "cosine")


class WarmupDecayLR(LRScheduler):
    """Per-step warmup + decay schedule; call ``step()`` after every optimizer step.

    Each group's learning rate is ``base_lr_g · lr_factor(t, ...)``, where ``base_lr_g`` is the
    group's ``initial_lr`` (its lr when the scheduler was built). ``state_dict()`` /
    ``load_state_dict()`` restore the position exactly (checkpoint resume).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int,
        final_ratio: float = 0.0,
        decay: str = "cosine",
        last_epoch: int = -1,
        decay_rate: float = 0.97,
        decay_steps: int | None = None,
    ) -> None:
        _check(warmup_steps, total_steps, final_ratio, decay, decay_rate, decay_steps)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.final_ratio = float(final_ratio)
        self.decay = decay
        self.decay_rate = float(decay_rate)
        self.decay_steps = None if decay_steps is None else int(decay_steps)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, self.final_ratio, self.decay,
                         self.decay_rate, self.decay_steps)  # fmt: skip

    def get_lr(self) -> list[float]:
        f = self.factor(max(self.last_epoch, 0))
        return [base * f for base in self.base_lrs]
