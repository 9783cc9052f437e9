"""Optimisation for normalizer-free training: AGC, MSR gradient projection, schedules, EMA and
parameter groups."""

from normfree.optim.agc import AGC, adaptive_clip_grad_, unitwise_norm
from normfree.optim.ema import ModelEMA, ema_decay
from normfree.optim.msr import MeanShiftRejection, project_zero_mean_, zero_mean_eligible
from normfree.optim.param_groups import build_param_groups, describe_param_groups
from normfree.optim.schedules import WarmupDecayLR, lr_factor, scaled_peak_lr, warmup_cosine_lr

__all__: list[str] = [
    "AGC",
    "MeanShiftRejection",
    "ModelEMA",
    "WarmupDecayLR",
    "adaptive_clip_grad_",
    "build_param_groups",
    "describe_param_groups",
    "ema_decay",
    "lr_factor",
    "project_zero_mean_",
    "scaled_peak_lr",
    "unitwise_norm",
    "warmup_cosine_lr",
    "zero_mean_eligible",
]
