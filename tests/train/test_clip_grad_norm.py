"""``optim.clip_grad_norm``: global-norm gradient clipping (Pascanu et al. 2013), the baseline
that AGC is compared with in ``normfree experiment agc``."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from normfree.train import Config, ConfigError, Trainer
from normfree.train.builders import make_train_loader
from normfree.train.distributed import DistInfo, ShardedBatchSampler

PLAIN_SGD = ["optim.agc=false", "optim.momentum=0.0", "optim.weight_decay=0.0", "optim.lr=1.0",
             "schedule.warmup_steps=0", "schedule.decay=constant", "train.batch_size=16",
             "data.crop=none", "ema.enabled=false", "train.label_smoothing=0.0",
             "data.spec=synthetic:num_classes=4,size=8,channels=1,n=32"]  # fmt: skip


def _update_norm(cfg: Config) -> float:
    trainer = Trainer(cfg, DistInfo())
    before = copy.deepcopy(trainer.model.state_dict())
    sampler = ShardedBatchSampler(len(trainer.bundle.train), 16, seed=cfg.seed, epoch=0)
    batch = next(iter(make_train_loader(trainer.bundle.train, sampler, 0, False)))
    trainer._train_step([batch])
    after = trainer.model.state_dict()
    sq = sum((after[k].double() - before[k].double()).square().sum() for k in before
             if before[k].is_floating_point())  # fmt: skip
    return float(torch.sqrt(sq))


def test_global_norm_clipping_bounds_the_sgd_step(make_cfg: Callable[..., Config]) -> None:
    free = _update_norm(make_cfg(*PLAIN_SGD, out="free"))
    assert free > 0.05  # the raw gradient norm (lr 1, plain SGD): far above the threshold
    clipped = _update_norm(make_cfg(*PLAIN_SGD, "optim.clip_grad_norm=0.001", out="clip"))
    assert clipped == pytest.approx(1e-3, rel=1e-3)  # lr · max_norm exactly
    loose = _update_norm(make_cfg(*PLAIN_SGD, "optim.clip_grad_norm=1000", out="loose"))
    assert loose == pytest.approx(free, rel=1e-5)  # a threshold above ‖G‖ changes nothing
    with pytest.raises(ConfigError, match=r"optim\.clip_grad_norm"):
        make_cfg("optim.clip_grad_norm=0")
