"""Optimisation for normalizer-free training: AGC, MSR gradient projection, schedules, EMA and
parameter groups."""

from normfree.optim.agc import AGC, adaptive_clip_grad_, unitwise_norm
from normfree.optim.msr import MeanShiftRejection, project_zero_mean_, zero_mean_eligible

__all__: list[str] = [
    "AGC",
    "MeanShiftRejection",
    "adaptive_clip_grad_",
    "project_zero_mean_",
    "unitwise_norm",
    "zero_mean_eligible",
]
