"""The training configuration: one typed tree of dataclasses (:class:`Config`).

Resolution order (later wins): the dataclass defaults (the NFNet ImageNet recipe of Brock et al.
2021b, App. C, where it applies) → a shipped recipe (``--recipe``, ``digits`` unless a config file
is given) → a YAML file (``--config``) → command-line overrides ``section.key=value``. Values are
parsed as YAML (``optim.lr=0.2``, ``data.flip=true``, ``data.randaugment=[2,9]``,
``optim.lr=null``) and validated against the field's type by pydantic; unknown or ill-typed keys
raise :class:`ConfigError` naming the key. ``normfree train --help`` lists every key
(:func:`config_help`). Parsing, recipes and overrides live in :mod:`normfree.train.config_io`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict

from normfree.models.registry import UnknownModelError, model_entrypoint
from normfree.nn.native import KERNELS, kernel_names

__all__ = [
    "UPDATE_IN_BACKWARD_ONE_PROCESS",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "DistillConfig",
    "EMAConfig",
    "LogConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainLoopConfig",
    "chosen_kernels",
    "native_kernel_choice",
    "validate_config",
    "validate_world_size",
]


# optim.update_in_backward in a job of several processes (refused before spawning, and by
# each process of a torchrun job)
UPDATE_IN_BACKWARD_ONE_PROCESS = (
    "config key 'optim.update_in_backward' must be false with several processes: the "
    "gradients must be all-reduced before the update (set optim.update_in_backward=false or "
    "train in one process)"
)


class ConfigError(ValueError):
    """A configuration key is unknown, ill-typed or out of range (the message names it)."""


# pydantic (normfree.train.config_io validates these dataclasses): unknown keys are errors
_PYDANTIC = ConfigDict(extra="forbid")


def _f(default: Any, help: str) -> Any:
    """A dataclass field with an immutable default and its ``--help`` text."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """Dataset, resolution, augmentation and batch mixing (``normfree.data``)."""

    __pydantic_config__: ClassVar[ConfigDict] = _PYDANTIC

    SHORTHAND: ClassVar[str] = "spec"

    spec: str = _f(
        "digits",
        "dataset: digits | hard-digits[:size=8] | cifar10:/dir | cifar100:/dir | "
        "imagefolder:/dir | synthetic:num_classes=10,size=32,channels=3,n=512",
    )
    image_size: int | None = _f(None, "training resolution (null: the dataset's own size)")
    test_size: int | None = _f(None, "evaluation resolution (null: as the data package decides)")
    val_fraction: float = _f(0.2, "held-out fraction when the dataset has no validation split")
    crop: Literal["none", "pad", "random_resized"] = _f("none", "training crop")
    pad: int = _f(4, "padding of the 'pad' crop, in pixels")
    flip: bool = _f(False, "random horizontal flips")
    randaugment: tuple[int, int] | Literal["model"] | None = _f(
        None, "RandAugment [num_ops, magnitude], model (the model's official level: NFNet "
        "F0 [4, 5], F1-F2 [4, 10], F3-F7 [4, 15]) or null"
    )
    mixup_alpha: float = _f(0.0, "MixUp Beta(α, α) (0: off; NFNet: 0.2)")
    cutmix_alpha: float = _f(0.0, "CutMix Beta(α, α) (0: off; NFNet: 1.0, uniform area)")
    mix_switch_prob: float = _f(0.5, "probability of CutMix when both are on")
    workers: int = _f(0, "DataLoader worker processes per rank")
    eval_batch_size: int | None = _f(None, "evaluation batch per rank (null: the training one)")
    skip_unreadable: bool = _f(
        False, "image folders: skip files that cannot be decoded (a warning names each one)"
    )


@dataclass
class OptimConfig:
    """Optimizer and Adaptive Gradient Clipping (Brock et al. 2021b, §4 and App. C)."""

    __pydantic_config__: ClassVar[ConfigDict] = _PYDANTIC

    name: Literal["sgd", "adamw", "adam", "rmsprop", "rmsprop_tf"] = _f(
        "sgd", "optimizer (rmsprop_tf: TensorFlow 1's RMSprop of the EfficientNet recipes, "
        "normfree.optim.RMSpropTF)"
    )
    lr: float | None = _f(None, "peak learning rate (null: base_lr · batch_size / 256)")
    base_lr: float = _f(0.1, "learning rate per 256 examples when lr is null")
    momentum: float = _f(0.9, "SGD/RMSprop momentum")
    alpha: float | None = _f(
        None, "RMSprop's decay of the squared-gradient average (null: 0.99 for rmsprop, "
        "PyTorch's default; 0.9 for rmsprop_tf, TensorFlow's)"
    )
    nesterov: bool = _f(True, "Nesterov momentum for SGD")
    weight_decay: float | Literal["model"] = _f(
        2e-5, "weight decay (not on gains, biases, scalars); model: the model's official value "
        "(NF-RegNets: 5e-5 for B0)"
    )
    betas: tuple[float, float] = _f((0.9, 0.999), "Adam/AdamW betas")
    eps: float = _f(1e-8, "Adam/AdamW/RMSprop epsilon (rmsprop_tf: inside the square root)")
    fused: bool | None = _f(
        None,
        "PyTorch's fused SGD/Adam/AdamW kernel (same update, one kernel per tensor; null: "
        "where this PyTorch has it for the parameters' device and dtype)",
    )
    agc: bool | None = _f(None, "Adaptive Gradient Clipping (null: the model's recipe, default on)")
    clipping: float = _f(0.01, "AGC λ (max ‖G‖/‖W‖ per unit)")
    agc_eps: float = _f(1e-3, "AGC ε (floor of ‖W‖)")
    clip_classifier: bool | Literal["bias"] = _f(
        False, "clip the final classifier with AGC: false (the paper), bias (only its bias, as "
        "DeepMind's code and the nfnet_imagenet recipe) or true (weight and bias)"
    )
    msr: bool | None = _f(
        None, "Mean Shift Rejection: keep conv kernels zero-mean (null: the model's recipe)"
    )
    clip_grad_norm: float | None = _f(
        None,
        "global-norm gradient clipping: rescale all gradients so ‖G‖₂ ≤ this (Pascanu et al. "
        "2013; the baseline AGC is compared with, Brock et al. 2021b §4; null: off)",
    )
    update_in_backward: bool = _f(
        False,
        "apply the optimizer's step (SGD, Adam or AdamW), with AGC, to the Scaled-WS conv "
        "weights inside their native backward (CPU, train.native_kernels on; "
        "normfree.optim.update_in_backward): the same update, no gradient memory for those "
        "weights, an SGD step 0.94-0.97x the time; needs optim.name sgd, adam or adamw, "
        "train.accum_steps 1, no fp16, no clip_grad_norm, no MSR and one process",
    )


@dataclass
class ScheduleConfig:
    """Per-step learning-rate schedule: linear warmup, then decay to final_ratio · peak."""

    __pydantic_config__: ClassVar[ConfigDict] = _PYDANTIC

    decay: Literal["cosine", "linear", "constant", "exponential"] = _f(
        "cosine", "decay after warmup (exponential: decay_rate every decay_epochs, the "
        "EfficientNet schedule)"
    )
    warmup_epochs: float = _f(5.0, "linear warmup length in epochs")
    warmup_steps: int | None = _f(None, "warmup length in optimizer steps (overrides epochs)")
    final_ratio: float = _f(0.0, "final lr as a fraction of the peak (exponential: its floor)")
    decay_rate: float = _f(0.97, "exponential decay: the lr's factor per period")
    decay_epochs: float = _f(
        2.4, "exponential decay: epochs per period (staircase, counted from the first step, as "
        "TensorFlow's EfficientNet code)"
    )


@dataclass
class TrainLoopConfig:
    """The training loop."""

    __pydantic_config__: ClassVar[ConfigDict] = _PYDANTIC

    epochs: int = _f(360, "number of epochs")
    batch_size: int = _f(4096, "global batch per optimizer step (all ranks, all accumulation)")
    accum_steps: int = _f(1, "gradient accumulation micro-batches per optimizer step")
    label_smoothing: float = _f(0.1, "label smoothing (applied after MixUp/CutMix)")
    drop_rate: float | None = _f(None, "classifier dropout (null: model metadata)")
    stochdepth_rate: float | None = _f(None, "stochastic depth rate (null: model metadata)")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "autocast dtype (fp16 uses a scaler)")
    channels_last: bool = _f(False, "channels_last memory format")
    compile: bool = _f(False, "torch.compile the model")
    grad_checkpointing: bool = _f(False, "recompute block activations in the backward pass")
    sync_bn: bool = _f(False, "SyncBatchNorm across ranks (BN baselines only)")
    skip_nonfinite: bool = _f(
        False, "skip steps with a NaN/Inf loss instead of stopping (5 in a row, or weights "
        "that are no longer finite, still stop the run)"
    )
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms(True)")
    threads: int | None = _f(
        None, "torch CPU threads per rank (null: cores / local ranks; more than the cores: the "
        "cores, with a warning)"
    )
    tune_malloc: bool = _f(
        True, "CPU, glibc: keep freed heap memory for the next step (process-wide)"
    )
    native_kernels: bool | tuple[str, ...] | str | None = _f(
        None,
        "CPU: normfree's optional C++ kernels during the run (true: all; names such as "
        "tanh_gelu or [scaled_ws, tanh_gelu]: those; false: none; null: as "
        "NORMFREE_NATIVE_KERNELS says); built once per machine (~20 s, a C++ compiler); if the "
        "build fails a warning says why and the PyTorch ops run",
    )
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    eval_every_epochs: int = _f(1, "evaluate every N epochs (and after the last)")
    checkpoint_every_steps: int = _f(0, "also write last.pt every N steps (0: each epoch)")
    max_steps_per_epoch: int | None = _f(None, "cut every epoch short after N optimizer steps")
    best_metric: Literal["val_top1", "ema_val_top1"] = _f("val_top1", "metric that picks best.pt")
    finetune_epochs: int = _f(
        0, "after training, fine-tune this many epochs at finetune_size (FixRes-style; 0: off)"
    )
    finetune_size: int | None = _f(
        None, "fine-tune/test resolution (null: model meta.recipe finetune_size, else test_size)"
    )
    finetune_lr_scale: float = _f(0.1, "fine-tune peak lr as a fraction of the main peak lr")


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (decay_t = min(decay, (1+t)/(10+t)))."""

    __pydantic_config__: ClassVar[ConfigDict] = _PYDANTIC

    enabled: bool = _f(True, "keep and evaluate an EMA of the weights")
    decay: float = _f(0.99999, "EMA decay")
    warmup: bool = _f(True, "use the (1+t)/(10+t) warmup")
    every_steps: int = _f(1, "update the EMA every N optimizer steps")


@dataclass
class LogConfig:
    """Run folder outputs and console progress."""

    __pydantic_config__: ClassVar[ConfigDict] = _PYDANTIC

    every_steps: int = _f(10, "write a per-step record to metrics.jsonl every N steps")
    progress: bool = _f(True, "tqdm progress bars")
    tensorboard: bool = _f(True, "TensorBoard logs (if tensorboard is installed)")
    csv: bool = _f(True, "metrics.csv with the per-epoch records")
    plot: bool = _f(True, "curves.png (if matplotlib is installed)")


@dataclass
class DistConfig:
    """torch.distributed (torchrun or --nproc)."""

    __pydantic_config__: ClassVar[ConfigDict] = _PYDANTIC

    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "auto: nccl on CUDA, gloo on CPU")
    timeout_s: int = _f(1800, "collective timeout in seconds")


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (normfree.train.distill; Hinton et al. 2015),
    e.g. the BN original of a model made by ``normfree convert``."""

    __pydantic_config__: ClassVar[ConfigDict] = _PYDANTIC

    teacher: str | None = _f(
        None,
        "teacher: a run folder / training checkpoint, or a model spec (torchvision:NAME, "
        "timm:NAME, a normfree name) with distill.teacher_weights; null: no distillation",
    )
    teacher_weights: str | None = _f(None, "the teacher spec's weights (.safetensors or .pt)")
    teacher_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "the teacher spec's constructor arguments"}
    )
    weight: float = _f(0.5, "w in (1-w)·CE + w·T²·KL(teacher || student)")
    temperature: float = _f(4.0, "softmax temperature T")


@dataclass
class Config:
    """Everything a training run needs; written to ``config.yaml`` in the run folder."""

    __pydantic_config__: ClassVar[ConfigDict] = _PYDANTIC

    model: str = _f("nf_resnet_cifar20", "registered model name (normfree models)")
    model_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "extra create_model arguments, e.g. {width: 2}"}
    )
    seed: int = _f(0, "seed of initialisation, data order, augmentation and mixing")
    init_from: str | None = _f(
        None,
        "initialise the weights from a checkpoint before training: a run folder (its best.pt, "
        "else last.pt), a normfree/timm/.safetensors file (fine-tuning; see "
        "normfree.load_pretrained)",
    )
    init_use_ema: bool = _f(False, "with init_from: take the checkpoint's EMA weights")
    init_head: bool = _f(
        True, "with init_from: load the classifier too; false keeps this model's new one "
        "(fine-tuning on other classes)"
    )
    out_dir: str | None = _f(None, "run folder (null: runs/<model>-<data>-<timestamp>)")
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def native_kernel_choice(
    value: bool | tuple[str, ...] | str | None,
) -> bool | tuple[str, ...] | None:
    """``train.native_kernels`` as :func:`normfree.nn.set_native_kernels` takes it: a bare name
    (or names joined by ``+`` or ``,``, as in ``NORMFREE_NATIVE_KERNELS``) becomes a tuple of
    names; ``True``, ``False``, ``None`` and tuples pass through."""
    return kernel_names(value) if isinstance(value, str) else value


def chosen_kernels(value: bool | tuple[str, ...] | list[str] | str | None) -> frozenset[str] | None:
    """The kernel pairs a ``train.native_kernels`` value names, however it is spelled
    (``true``, ``scaled_ws``, ``[scaled_ws]``); None for ``null`` (the environment's
    choice)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return frozenset(KERNELS) if value else frozenset()
    return frozenset(native_kernel_choice(value if isinstance(value, str) else tuple(value)))


def _non_finite(obj: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first float setting of ``obj`` (a config dataclass, sections included) that is
    NaN or infinite: ``(dotted key, value, default)``; None when every one is finite. The
    free-form mappings (``model_kwargs``, ``distill.teacher_kwargs``) are their owners' to
    check."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            found = _non_finite(value, f"{prefix}{f.name}.")
            if found is not None:
                return found
            continue
        items = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            return f"{prefix}{f.name}", value, f.default
    return None


def validate_config(cfg: Config) -> None:
    """Range checks the types cannot express; raises :class:`ConfigError` naming the key.

    It assumes each field already has its declared type, as a config read from a file has.
    For a :class:`Config` built or changed in code use
    :func:`normfree.train.config_io.checked_config`, which checks the types first (as
    :func:`normfree.train.train` does)."""
    found = _non_finite(cfg)  # .inf / .nan parse as floats: no setting means them
    if found is not None:
        key, value, default = found
        what = "finite numbers" if isinstance(value, tuple) else "a finite number"
        if default is None:
            what += " or null"
        elif default is not dataclasses.MISSING:
            what += f" (default {list(default) if isinstance(default, tuple) else default!r})"
        raise ConfigError(f"config key {key!r} must be {what}, got {value!r}")

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            value: Any = cfg
            for part in key.split("."):
                value = getattr(value, part)
            raise ConfigError(f"config key {key!r} must be {what}, got {value!r}")

    t, o, d = cfg.train, cfg.optim, cfg.data
    need(bool(cfg.model), "model", "a model name")
    # torch's generators take 64-bit seeds, and the run seeds its loaders with seed + epoch
    need(-(2**63) <= cfg.seed < 2**63, "seed", "an integer in [-2**63, 2**63)")
    try:
        if not cfg.model.startswith("converted:"):  # normfree.convert.CONVERTED_PREFIX
            model_entrypoint(cfg.model)
    except UnknownModelError as e:
        raise ConfigError(f"model={cfg.model!r}: {e}") from None
    for key in ("num_classes", "in_chans"):  # (they come from the data)
        if key in cfg.model_kwargs:
            raise ConfigError(
                f"config key 'model_kwargs.{key}': the trainer takes {key} from the dataset; "
                "drop it (to fine-tune a model trained on other classes, give init_from= with "
                "init_head=false)"
            )
    need(t.epochs > 0, "train.epochs", "> 0")
    need(t.batch_size > 0, "train.batch_size", "> 0")
    need(t.accum_steps > 0, "train.accum_steps", "> 0")
    need(t.batch_size % t.accum_steps == 0, "train.batch_size", "divisible by train.accum_steps")
    need(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", "in [0, 1)")
    need(t.drop_rate is None or 0.0 <= t.drop_rate < 1.0, "train.drop_rate", "in [0, 1)")
    need(
        t.stochdepth_rate is None or 0.0 <= t.stochdepth_rate < 1.0,
        "train.stochdepth_rate",
        "in [0, 1)",
    )
    need(t.threads is None or t.threads > 0, "train.threads", "> 0 or null")
    choice = native_kernel_choice(t.native_kernels)
    need(
        not isinstance(choice, tuple) or set(choice) <= set(KERNELS),
        "train.native_kernels",
        f"true, false, null or kernel names from {list(KERNELS)}",
    )
    need(t.finetune_epochs >= 0, "train.finetune_epochs", ">= 0")
    need(t.finetune_size is None or t.finetune_size > 0, "train.finetune_size", "> 0 or null")
    need(t.finetune_lr_scale > 0, "train.finetune_lr_scale", "> 0")
    need(t.eval_every_epochs > 0, "train.eval_every_epochs", "> 0")
    need(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", ">= 0")
    need(o.lr is None or o.lr > 0, "optim.lr", "> 0 or null")
    need(o.base_lr > 0, "optim.base_lr", "> 0")
    need(o.weight_decay == "model" or o.weight_decay >= 0, "optim.weight_decay", ">= 0 or model")
    need(0.0 <= o.momentum < 1.0, "optim.momentum", "in [0, 1)")
    need(o.clipping > 0, "optim.clipping", "> 0")
    need(o.agc_eps > 0, "optim.agc_eps", "> 0")
    need(o.clip_grad_norm is None or o.clip_grad_norm > 0, "optim.clip_grad_norm", "> 0 or null")
    need(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", "two numbers in [0, 1)")
    need(o.eps > 0, "optim.eps", "> 0")
    need(o.alpha is None or 0.0 <= o.alpha <= 1.0, "optim.alpha", "in [0, 1] or null")
    if o.update_in_backward:  # an optimizer step inside the backward: one backward per step
        for ok, key, rule in (
            (o.name in ("sgd", "adam", "adamw"), "optim.name", "sgd, adam or adamw"),
            (t.accum_steps == 1, "train.accum_steps", "1"),
            (t.precision != "fp16", "train.precision", "fp32 or bf16 (no GradScaler)"),
            (o.clip_grad_norm is None, "optim.clip_grad_norm", "null"),
            (o.msr is not True, "optim.msr", "false or null"),
            (choice is not False and (not isinstance(choice, tuple) or "scaled_ws" in choice),
             "train.native_kernels", "true, null or a list with scaled_ws"),
        ):  # fmt: skip
            need(ok, key, f"{rule} with optim.update_in_backward=true")
    s = cfg.schedule
    need(s.warmup_epochs >= 0, "schedule.warmup_epochs", ">= 0")
    need(s.warmup_steps is None or s.warmup_steps >= 0, "schedule.warmup_steps", ">= 0 or null")
    need(0.0 <= s.final_ratio <= 1.0, "schedule.final_ratio", "in [0, 1]")
    need(0.0 < s.decay_rate <= 1.0, "schedule.decay_rate", "in (0, 1]")
    need(s.decay_epochs > 0, "schedule.decay_epochs", "> 0")
    need(0.0 < d.val_fraction < 1.0, "data.val_fraction", "in (0, 1)")
    need(d.image_size is None or d.image_size > 0, "data.image_size", "> 0 or null")
    need(d.test_size is None or d.test_size > 0, "data.test_size", "> 0 or null")
    need(d.workers >= 0, "data.workers", ">= 0")
    teacher = cfg.distill.teacher
    need(  # an empty value read as the current folder, a run folder to distil from
        teacher is None or bool(teacher.strip()),
        "distill.teacher",
        "a run folder, a checkpoint or a model spec, or null (no distillation)",
    )
    need(0.0 <= cfg.distill.weight <= 1.0, "distill.weight", "in [0, 1]")
    need(cfg.distill.temperature > 0, "distill.temperature", "> 0")
    need(d.pad >= 0, "data.pad", ">= 0")
    need(
        not isinstance(d.randaugment, tuple) or (d.randaugment[0] >= 0 and d.randaugment[1] >= 0),
        "data.randaugment",
        "[num_ops >= 0, magnitude >= 0], model or null",
    )
    need(d.mixup_alpha >= 0, "data.mixup_alpha", ">= 0")
    need(d.cutmix_alpha >= 0, "data.cutmix_alpha", ">= 0")
    need(0.0 <= d.mix_switch_prob <= 1.0, "data.mix_switch_prob", "in [0, 1]")
    need(d.eval_batch_size is None or d.eval_batch_size > 0, "data.eval_batch_size", "> 0 or null")
    need(0.0 <= cfg.ema.decay <= 1.0, "ema.decay", "in [0, 1]")
    need(cfg.ema.every_steps > 0, "ema.every_steps", "> 0")
    need(cfg.log.every_steps > 0, "log.every_steps", "> 0")
    need(cfg.dist.timeout_s > 0, "dist.timeout_s", "> 0")
    need(
        t.max_steps_per_epoch is None or t.max_steps_per_epoch > 0,
        "train.max_steps_per_epoch",
        "> 0",
    )
    need(
        t.best_metric == "val_top1" or cfg.ema.enabled, "train.best_metric", "val_top1 without EMA"
    )


def validate_world_size(cfg: Config, world_size: int) -> None:
    """Refuse (:class:`ConfigError`) a ``train.batch_size`` that ``world_size`` processes of
    ``train.accum_steps`` equal micro-batches cannot split: the global batch of each step is
    ``world_size × accum_steps`` micro-batches of one size (Brock et al. 2021b train at one
    global batch however many devices share it). Checked before processes are spawned and
    before a run folder is written."""
    t = cfg.train
    parts = world_size * t.accum_steps
    if t.batch_size % parts:
        below, above = t.batch_size // parts * parts, (t.batch_size // parts + 1) * parts
        near = f"{below} or {above}" if below else str(above)
        raise ConfigError(
            f"config key 'train.batch_size' must be divisible by processes × train.accum_steps "
            f"= {world_size} × {t.accum_steps} = {parts}, got {t.batch_size}; use e.g. {near}"
        )
