"""Build the pieces of a run from a :class:`~normfree.train.config.Config`: data, model,
optimizer (+AGC), schedule and data loaders. The NFNet recipe (Brock et al. 2021b, App. C) is
the default; models declare their deviations (``meta.recipe``, ``lr_scale``)."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from normfree.models import UnknownModelError, count_params, create_model
from normfree.optim.fused import fused_available
from normfree.optim.param_groups import build_param_groups
from normfree.optim.rmsprop_tf import RMSpropTF
from normfree.optim.schedules import WarmupDecayLR, scaled_peak_lr
from normfree.train.config import Config, ConfigError
from normfree.train.distributed import SeededDataset, ShardedBatchSampler, shard_indices

__all__ = [
    "agc_enabled",
    "build_data",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "check_input_size",
    "count_params",
    "dataset_kind",
    "init_weights_from",
    "make_eval_loader",
    "make_train_loader",
    "model_args",
    "model_resolution",
    "msr_enabled",
    "peak_lr",
    "seed_globals",
    "steps_per_epoch",
    "use_fused_optimizer",
    "warmup_steps",
]

log = logging.getLogger("normfree.train")


def seed_globals(seed: int) -> None:
    """Seed Python's, NumPy's legacy and torch's global generators with ``seed``: what a fresh
    run does before :func:`build_data` and :func:`build_model`, so that the same calls after
    ``seed_globals(cfg.seed)`` rebuild the run's initial model exactly."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))  # noqa: NPY002  (the global legacy RNG is what runs save)
    torch.manual_seed(seed)


def dataset_kind(spec: str) -> str:
    return spec.partition(":")[0].strip().lower()


def _refuse_file_loading(kwargs: dict[str, Any]) -> None:
    """A :class:`ConfigError` when model options would load weights from another file
    (``pretrained``, ``checkpoint_path``...): model arguments come from checkpoints and run
    folders too, and must not choose other files to read."""
    from normfree.convert.sources import file_loading_options

    loads = file_loading_options(kwargs)
    if loads:
        raise ConfigError(
            f"model options {loads} would load weights from another file; a run takes its "
            "weights from init_from=FILE"
        )


def model_resolution(cfg: Config, meta: Any | None = None) -> tuple[int | None, int | None]:
    """Train/test sizes for ``build_datasets``: the config's, else — for image folders, whose
    images have no native size — the model's ``meta.train_size`` / ``meta.test_size``
    (NFNet-F0: 192/256). Fixed-size datasets (digits, CIFAR, synthetic) keep their own size."""
    size, test = cfg.data.image_size, cfg.data.test_size
    if dataset_kind(cfg.data.spec) != "imagefolder" or (size and test):
        return size, test
    meta = _model_meta(cfg, meta)
    return size or meta.train_size, test or meta.test_size


def _model_meta(cfg: Config, meta: Any | None) -> Any:
    """``meta``, or the configured model's (a throw-away instance, only for its metadata)."""
    if meta is None:
        _refuse_file_loading(cfg.model_kwargs)
        meta = create_model(cfg.model, num_classes=1, **cfg.model_kwargs).meta
    return meta


def _model_hint(cfg: Config, meta: Any | None, key: str, config_key: str, fix: str) -> Any:
    """The model's recorded official setting ``meta.recipe[key]``, for a config value
    ``model``; a :class:`ConfigError` naming ``config_key`` when the model records none."""
    recipe = getattr(meta, "recipe", None) or {}
    if recipe.get(key) is None:
        raise ConfigError(
            f"config key '{config_key}' is model, but {cfg.model} records no official "
            f"{key.replace('_', ' ')}; {fix}"
        )
    return recipe[key]


def randaugment_setting(cfg: Config, meta: Any | None = None) -> tuple[int, int] | None:
    """``data.randaugment`` as ``(num_ops, magnitude)``: ``model`` takes the model's official
    level (NFNets: DeepMind's ``RA_level``, layers then magnitude, "405" for F0)."""
    value = cfg.data.randaugment
    if value != "model":
        return (int(value[0]), int(value[1])) if value else None
    level = str(_model_hint(cfg, _model_meta(cfg, meta), "randaugment", "data.randaugment",
                            "give [num_ops, magnitude] or null"))  # fmt: skip
    return int(level[0]), int(level[1:])


def weight_decay_setting(cfg: Config, model: nn.Module) -> float:
    """``optim.weight_decay``: ``model`` takes the model's official value (NF-RegNets)."""
    value = cfg.optim.weight_decay
    if value != "model":
        return float(value)
    meta = getattr(model, "meta", None)
    return float(_model_hint(cfg, meta, "weight_decay", "optim.weight_decay", "give a number"))


def build_data(
    cfg: Config,
    *,
    test_size: int | None = None,
    train_augment: bool = True,
    meta: Any | None = None,
) -> Any:
    """``normfree.data.build_datasets`` with the config's spec, sizes (:func:`model_resolution`)
    and augmentation."""
    from normfree.data import AugmentConfig, build_datasets

    d = cfg.data
    if meta is None and d.randaugment == "model" and train_augment:
        meta = _model_meta(cfg, None)  # (one probe for both the level and the sizes)
    image_size, default_test = model_resolution(cfg, meta)
    augment = None
    if train_augment:
        augment = AugmentConfig(
            crop=d.crop,
            pad=d.pad,
            flip=d.flip,
            randaugment=randaugment_setting(cfg, meta),
        )
    try:
        bundle = build_datasets(
            d.spec,
            image_size=image_size,
            test_size=test_size if test_size is not None else default_test,
            augment=augment,
            seed=cfg.seed,
            val_fraction=d.val_fraction,
        )
    except (OSError, ValueError, ImportError) as e:  # missing / malformed data, missing extra
        raise ConfigError(f"data.spec={d.spec!r}: {e}") from e
    for name, split in (("training", bundle.train), ("held-out", bundle.val)):
        if len(split) == 0:
            raise ConfigError(
                f"data.spec={d.spec!r}: its {name} split holds no images (data.val_fraction="
                f"{d.val_fraction} where the data has no held-out split of its own); give more "
                "images or a larger data.val_fraction"
            )
    for split in (bundle.train, bundle.val):  # image folders: data.skip_unreadable
        if hasattr(split, "skip_unreadable"):
            split.skip_unreadable = d.skip_unreadable
    return bundle


def model_args(cfg: Config, num_classes: int, in_chans: int) -> dict[str, Any]:
    """The ``create_model`` call of a run (stored in checkpoints to rebuild the model)."""
    kwargs: dict[str, Any] = dict(cfg.model_kwargs)
    if cfg.train.drop_rate is not None:
        kwargs["drop_rate"] = cfg.train.drop_rate
    if cfg.train.stochdepth_rate is not None:
        kwargs["stochdepth_rate"] = cfg.train.stochdepth_rate
    return {"name": cfg.model, "num_classes": num_classes, "in_chans": in_chans, "kwargs": kwargs}


def build_model(args: dict[str, Any]) -> nn.Module:
    """``create_model`` from :func:`model_args` output; dropout and stochastic depth come from
    the model's metadata unless the config overrides them. ``model=converted:PATH`` loads a
    model written by ``normfree convert`` (:func:`normfree.convert.build_converted`)."""
    from normfree.convert.api import CONVERTED_PREFIX

    _refuse_file_loading(args["kwargs"])
    if str(args["name"]).startswith(CONVERTED_PREFIX):
        from normfree.convert.api import build_converted

        try:
            return build_converted(
                args["name"], args["num_classes"], args["in_chans"], args["kwargs"]
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"model {args['name']!r}: {e}") from e
    try:
        return create_model(
            args["name"],
            num_classes=args["num_classes"],
            in_chans=args["in_chans"],
            **args["kwargs"],
        )
    except UnknownModelError as e:  # e.g. a checkpoint of a newer normfree or a plugin model
        raise ConfigError(str(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {args['name']!r} rejected its arguments: {e}") from e


def _recipe_flag(value: bool | None, model: nn.Module, key: str, default: bool) -> bool:
    """The config's value if set, else the model's ``meta.recipe[key]``, else ``default``."""
    if value is not None:
        return value
    recipe = getattr(getattr(model, "meta", None), "recipe", {}) or {}
    return bool(recipe.get(key, default))


def agc_enabled(cfg: Config, model: nn.Module) -> bool:
    """``optim.agc`` if set, else the model's recipe hint (BN baselines: off), else on."""
    return _recipe_flag(cfg.optim.agc, model, "agc", True)


def msr_enabled(cfg: Config, model: nn.Module) -> bool:
    """``optim.msr`` if set, else the model's recipe hint (MSR ResNets: on), else off."""
    return _recipe_flag(cfg.optim.msr, model, "msr", False)


def peak_lr(cfg: Config) -> float:
    """``optim.lr``, or ``base_lr · batch_size / 256`` (Brock et al. 2021b: 0.1 · B/256)."""
    return (
        cfg.optim.lr
        if cfg.optim.lr is not None
        else scaled_peak_lr(cfg.optim.base_lr, cfg.train.batch_size)
    )


# optim.name → the torch.optim class
_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam,
    "rmsprop": torch.optim.RMSprop, "rmsprop_tf": RMSpropTF,
}  # fmt: skip


def _optimizer_kwargs(cfg: Config) -> dict[str, Any]:
    """``optim.*`` as keyword arguments of ``optim.name``'s class (lr aside)."""
    o = cfg.optim
    if o.name == "sgd":
        return {"momentum": o.momentum, "nesterov": o.nesterov and o.momentum > 0}
    if o.name in ("rmsprop", "rmsprop_tf"):
        alpha = {} if o.alpha is None else {"alpha": o.alpha}  # (None: the class's own)
        return {"momentum": o.momentum, "eps": o.eps, **alpha}
    return {"betas": o.betas, "eps": o.eps}


def use_fused_optimizer(cfg: Config, params: list[Any]) -> bool:
    """Whether :func:`build_optimizer` builds the fused form of ``optim.name`` over ``params``
    (tensors or param groups): ``optim.fused`` when set, otherwise wherever PyTorch has the
    fused kernel for them (:func:`normfree.optim.fused_available`; RMSprop has none). Raises
    ConfigError when ``optim.fused=true`` asks for one that does not exist here."""
    o = cfg.optim
    if o.fused is False:  # the per-tensor loop was asked for: nothing to probe
        return False
    available = fused_available(_OPTIMIZERS[o.name], params)
    if o.fused and not available:
        raise ConfigError(
            f"optim.fused=true: PyTorch {torch.__version__} has no fused {o.name} for these "
            "parameters' device/dtype; set optim.fused=null (use it where it exists) or false"
        )
    return available if o.fused is None else o.fused


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over :func:`~normfree.optim.param_groups.build_param_groups`, wrapped in
    :class:`~normfree.optim.AGC` unless AGC is off (groups carry their own ``clipping``)."""
    o = cfg.optim
    use_agc = agc_enabled(cfg, model)
    lr = peak_lr(cfg)
    groups = build_param_groups(
        model,
        lr=lr,
        weight_decay=weight_decay_setting(cfg, model),
        clipping=o.clipping if use_agc else None,
        clip_classifier=o.clip_classifier,
    )
    kwargs = _optimizer_kwargs(cfg)
    if use_fused_optimizer(cfg, groups):
        kwargs["fused"] = True
    opt = _OPTIMIZERS[o.name](groups, lr=lr, **kwargs)
    if use_agc:
        from normfree.optim.agc import attach_agc

        # clipping per group (None on the classifier group), so no name-based exclusion here
        attach_agc(opt, clipping=o.clipping, eps=o.agc_eps, exclude=())
    if msr_enabled(cfg, model):
        from normfree.optim.msr import attach_msr

        # plain SGD keeps projected weights on the isocline; adaptive optimizers need the
        # update re-projected (Ruff et al. 2019, §3; see normfree.optim.msr)
        mode = "project_grad" if o.name == "sgd" else "project_update"
        attach_msr(opt, model, mode=mode)
    return opt


def warmup_steps(cfg: Config, steps_per_epoch: int, total_steps: int) -> int:
    s = cfg.schedule
    steps = (
        s.warmup_steps if s.warmup_steps is not None else round(s.warmup_epochs * steps_per_epoch)
    )
    if steps > total_steps:
        log.warning(
            "warmup (%d steps) is longer than the run (%d steps): clamped", steps, total_steps
        )
    return min(steps, total_steps)


def build_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> WarmupDecayLR:
    """Per-step linear warmup then ``schedule.decay`` over ``epochs · steps_per_epoch`` steps
    (an exponential decay's period: ``schedule.decay_epochs`` in steps, at least 1)."""
    total = cfg.train.epochs * steps_per_epoch
    s = cfg.schedule
    return WarmupDecayLR(
        optimizer,
        warmup_steps=warmup_steps(cfg, steps_per_epoch, total),
        total_steps=total,
        final_ratio=s.final_ratio,
        decay=s.decay,
        decay_rate=s.decay_rate,
        decay_steps=max(1, round(s.decay_epochs * steps_per_epoch)),
    )


def make_train_loader(
    dataset: Dataset, sampler: ShardedBatchSampler, workers: int, pin_memory: bool
) -> DataLoader:
    """DataLoader over ``SeededDataset(dataset)`` with this rank's batch sampler. The loader
    gets its own generator so that it never draws from the global RNG (exact resume)."""
    return DataLoader(
        SeededDataset(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(sampler.seed + sampler.epoch),
        persistent_workers=False,
    )


def make_eval_loader(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, workers: int, pin_memory: bool
) -> DataLoader:
    """Loader of this rank's evaluation shard (``rank::world_size``, no padding)."""
    if world_size > 1:
        dataset = Subset(dataset, shard_indices(len(dataset), rank, world_size))  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )


def steps_per_epoch(cfg: Config, num_examples: int) -> int:
    """Optimizer steps per epoch (incomplete last global batch dropped)."""
    steps = num_examples // cfg.train.batch_size
    if steps == 0:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the training set "
            f"({num_examples} examples)"
        )
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    return steps


def check_input_size(model: nn.Module, size: int | None, key: str) -> None:
    """Refuse inputs smaller than the model's total stride (its deepest ``feature_info``
    reduction, e.g. 32 for NFNets): below it the last feature map is computed from padding
    alone and the model trains on nothing (a 1×1 input into nfnet_f0)."""
    infos = getattr(model, "feature_info", None) or []
    minimum = max((int(f.reduction) for f in infos), default=1)
    if size is not None and size < minimum:
        name = getattr(getattr(model, "meta", None), "name", type(model).__name__)
        raise ConfigError(
            f"{key}={size}: {size}x{size} inputs are below {name}'s minimum size of "
            f"{minimum}x{minimum} (its total stride); use images of at least {minimum} pixels "
            "or a model made for small images"
        )


def init_weights_from(cfg: Config, model: nn.Module) -> None:
    """Load ``cfg.init_from`` into a fresh model (fine-tuning): a run folder means its
    ``best.pt``, else its ``last.pt`` (a run stopped before its first evaluation), as for
    ``normfree eval`` and ``distill.teacher``; any format :func:`normfree.load_pretrained`
    reads is accepted. With ``init_head=false`` the classifier is not loaded (the model keeps
    its new one)."""
    if not cfg.init_from:
        return
    from pathlib import Path

    from normfree.checkpoints import CheckpointMismatchError, load_pretrained
    from normfree.train.evaluate import resolve_checkpoint_path

    path = Path(cfg.init_from)
    if path.is_dir():
        path = resolve_checkpoint_path(path)
    head = list(getattr(model, "classifier_parameter_names", list)())
    try:
        load_pretrained(
            model, path, use_ema=cfg.init_use_ema, exclude=() if cfg.init_head else head
        )
    except CheckpointMismatchError as e:
        if cfg.init_head and head and set(e.differences) <= set(head):
            raise ConfigError(
                f"init_from={str(path)!r}: its classifier does not fit this model's ("
                f"{', '.join(e.differences)}); pass init_head=false to start the classifier "
                "afresh (fine-tuning on other classes)"
            ) from None
        raise
