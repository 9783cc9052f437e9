"""Training and evaluation: the NFNet recipe (Brock et al. 2021b, App. C) as ``normfree train``.

* :class:`Config` and its sections (typed, YAML + ``key=value`` overrides, shipped recipes);
* :func:`train` / :class:`Trainer` (DDP, AGC, EMA, warmup+cosine, exact resume);
* :func:`evaluate` / :func:`evaluate_checkpoint` (raw and EMA top-1/top-5);
* :func:`save_checkpoint` / :func:`load_checkpoint` (atomic, ``weights_only``);
* :func:`tune_malloc` / :func:`release_heap` (glibc keeps freed heap memory for the next CPU
  train step; gives it back before DataLoader workers fork).
"""

from normfree.train.allocator import release_heap, tune_malloc
from normfree.train.callbacks import Callback
from normfree.train.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
from normfree.train.config import (
    Config,
    ConfigError,
    DataConfig,
    DistConfig,
    EMAConfig,
    LogConfig,
    OptimConfig,
    ScheduleConfig,
    TrainLoopConfig,
    validate_config,
)
from normfree.train.config_io import (
    apply_overrides,
    config_diff,
    config_from_dict,
    config_help,
    config_to_dict,
    dump_config,
    list_recipes,
    load_recipe,
    resolve_config,
)
from normfree.train.evaluate import evaluate, evaluate_checkpoint
from normfree.train.loop import (
    NonFiniteLossError,
    RunAlreadyComplete,
    Trainer,
    TrainingInterrupted,
    train,
)

__all__ = [
    "Callback",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "EMAConfig",
    "LogConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "RunAlreadyComplete",
    "ScheduleConfig",
    "TrainLoopConfig",
    "Trainer",
    "TrainingInterrupted",
    "apply_overrides",
    "config_diff",
    "config_from_dict",
    "config_help",
    "config_to_dict",
    "dump_config",
    "evaluate",
    "evaluate_checkpoint",
    "list_recipes",
    "load_checkpoint",
    "load_recipe",
    "release_heap",
    "resolve_config",
    "save_checkpoint",
    "train",
    "tune_malloc",
    "validate_config",
]
