"""Optimisation for normalizer-free training: AGC, MSR gradient projection, schedules, EMA,
parameter groups, TensorFlow's RMSprop (the EfficientNet recipes), and the optimizer step (SGD,
Adam, AdamW) of the Scaled-WS weights applied inside their backward."""

from normfree.optim.agc import (
    AGC,
    adaptive_clip_grad_,
    attach_agc,
    unclipped_classifier,
    unitwise_norm,
)
from normfree.optim.backward_update import BackwardUpdate, update_in_backward
from normfree.optim.ema import ModelEMA, ema_decay
from normfree.optim.fused import fused_available
from normfree.optim.hooks import after_step_hook, attached, before_step_hook
from normfree.optim.msr import (
    MeanShiftRejection,
    attach_msr,
    project_zero_mean_,
    zero_mean_eligible,
)
from normfree.optim.param_groups import build_param_groups, describe_param_groups
from normfree.optim.rmsprop_tf import RMSpropTF
from normfree.optim.schedules import WarmupDecayLR, lr_factor, scaled_peak_lr, warmup_cosine_lr

__all__: list[str] = [
    "AGC",
    "BackwardUpdate",
    "MeanShiftRejection",
    "ModelEMA",
    "RMSpropTF",
    "WarmupDecayLR",
    "adaptive_clip_grad_",
    "after_step_hook",
    "attach_agc",
    "attach_msr",
    "attached",
    "before_step_hook",
    "build_param_groups",
    "describe_param_groups",
    "ema_decay",
    "fused_available",
    "lr_factor",
    "project_zero_mean_",
    "scaled_peak_lr",
    "unclipped_classifier",
    "unitwise_norm",
    "update_in_backward",
    "warmup_cosine_lr",
    "zero_mean_eligible",
]
