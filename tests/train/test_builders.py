"""Recipe wiring: optimizer choice with AGC, models' recipe hints, schedule length,
resolution from model metadata, accumulation and precision options."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

import normfree
from normfree.optim import AGC, attached
from normfree.train import Config, ConfigError, Trainer, train
from normfree.train import builders as B
from normfree.train.distributed import DistInfo


def test_sgd_nesterov_with_agc_and_the_classifier_unclipped(
    make_cfg: Callable[..., Config],
) -> None:
    cfg = make_cfg()
    model = normfree.create_model("nf_resnet_cifar20", num_classes=10, in_chans=1)
    opt = B.build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and [type(a) for a in attached(opt)] == [AGC]
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    clip = {n: g["clipping"] for g in opt.param_groups for n in g["param_names"]}
    assert clip["head.fc.weight"] is None and clip["head.fc.bias"] is None
    assert clip["stem.conv.weight"] == cfg.optim.clipping == 0.2
    assert all(g["lr"] == pytest.approx(0.4) for g in opt.param_groups)


@pytest.mark.parametrize("name", ["adamw", "adam", "rmsprop", "rmsprop_tf"])
def test_other_optimizers_still_clip(make_cfg: Callable[..., Config], name: str) -> None:
    cfg = make_cfg(f"optim.name={name}")
    opt = B.build_optimizer(cfg, normfree.create_model("nf_resnet_cifar20", num_classes=10))
    assert [type(a) for a in attached(opt)] == [AGC]
    assert type(opt).__name__.lower() == name.replace("_", "")


def test_model_recipe_hints(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg()
    bn = normfree.create_model("bn_resnet_cifar20", num_classes=10)
    assert not B.agc_enabled(cfg, bn) and not attached(B.build_optimizer(cfg, bn))
    assert B.agc_enabled(make_cfg("optim.agc=true"), bn)  # the config wins
    fixup = normfree.create_model("fixup_resnet_cifar20", num_classes=10)
    opt = B.build_optimizer(cfg, fixup)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    for n in lrs:
        assert lrs[n] == pytest.approx(0.4 * fixup.lr_scale(n))
    assert min(lrs.values()) == pytest.approx(0.04)


def test_schedule_and_resolution(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("schedule.warmup_epochs=1.5")
    assert B.steps_per_epoch(cfg, 1438) == 22 and B.warmup_steps(cfg, 22, 440) == 33
    sched = B.build_scheduler(cfg, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], 0.4), 22)
    assert sched.total_steps == 20 * 22 and sched.warmup_steps == 33
    assert B.model_resolution(cfg) == (None, None)  # digits keeps its 8x8
    folder = make_cfg("data=imagefolder:/nowhere", "model=nf_regnet_b0")
    assert B.model_resolution(folder) == (192, 224)  # the model's train/test sizes
    sized = make_cfg("data=imagefolder:/nowhere", "data.image_size=64", "data.test_size=80")
    assert B.model_resolution(sized) == (64, 80)


def test_model_overrides_reach_the_model(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("train.drop_rate=0.3", "train.stochdepth_rate=0.2")
    model = B.build_model(B.model_args(cfg, 10, 1))
    assert model.meta.drop_rate == 0.3 and model.meta.stochdepth_rate == 0.2
    default = B.build_model(B.model_args(make_cfg(), 10, 1))
    assert default.meta.drop_rate == normfree.create_model("nf_resnet_cifar20").meta.drop_rate


def test_gradient_accumulation_matches_the_full_batch(make_cfg: Callable[..., Config]) -> None:
    common = [
        "train.epochs=1",
        "train.max_steps_per_epoch=3",
        "train.batch_size=32",
        "ema.enabled=false",
    ]
    one = train(make_cfg(*common, out="a"))
    two = train(make_cfg(*common, "train.accum_steps=4", out="b"))
    a = torch.load(f"{one['run_dir']}/last.pt", weights_only=True)["model"]
    b = torch.load(f"{two['run_dir']}/last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_bf16_channels_last_and_sync_bn_warning(
    make_cfg: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_cfg(
        "train.precision=bf16",
        "train.channels_last=true",
        "train.sync_bn=true",
        "train.batch_size=16",
        "train.max_steps_per_epoch=2",
        "train.epochs=1",
    )
    with caplog.at_level(logging.WARNING, logger="normfree.train"):
        trainer = Trainer(cfg, DistInfo())
    assert "no BatchNorm" in caplog.text
    summary = trainer.fit()
    assert summary["steps"] == 2 and summary["val_loss"] is not None
    assert trainer.model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_sync_bn_is_gpu_only_and_a_no_op_for_nf_models(make_cfg: Callable[..., Config]) -> None:
    from normfree.train.config import ConfigError
    from normfree.train.trainer_state import setup_sync_batchnorm

    cfg = make_cfg("train.sync_bn=true")
    bn = normfree.create_model("bn_resnet_cifar20", num_classes=10)
    two_cpu_ranks = DistInfo(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="sync_bn needs CUDA"):
        setup_sync_batchnorm(bn, cfg, two_cpu_ranks)
    assert setup_sync_batchnorm(bn, cfg, DistInfo()) is bn  # single process: nothing to sync
    nf = normfree.create_model("nf_resnet_cifar20", num_classes=10)
    assert setup_sync_batchnorm(nf, cfg, two_cpu_ranks) is nf  # no BatchNorm at all


def _steps(cfg: Config, steps: int = 3) -> list[torch.Tensor]:
    """The float64 weights of nf_resnet_cifar20 after ``steps`` optimizer steps of ``cfg``'s
    optimizer (AGC attached) on fixed random data."""
    torch.manual_seed(0)
    model = normfree.create_model("nf_resnet_cifar20", num_classes=10, in_chans=1).double()
    opt = B.build_optimizer(cfg, model)
    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_where_available_with_the_same_update(
    make_cfg: Callable[..., Config], name: str
) -> None:
    """optim.fused=null builds PyTorch's fused kernel where this build has it (CPU from torch
    2.4): the same update as the per-tensor loop (optim.fused=false), AGC included; float64
    weights after three steps agree to rounding (the kernels order a few operations
    differently)."""
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    available = normfree.optim.fused_available(cls, [torch.zeros(1)])
    model = normfree.create_model("nf_resnet_cifar20", num_classes=10)
    auto = B.build_optimizer(make_cfg(f"optim.name={name}"), model)
    off = B.build_optimizer(make_cfg(f"optim.name={name}", "optim.fused=false"), model)
    assert bool(auto.defaults["fused"]) == available and not off.defaults["fused"]
    if not available:
        pytest.skip(f"no fused CPU {name} in torch {torch.__version__}")
    fused = _steps(make_cfg(f"optim.name={name}", "optim.lr=0.05"))
    loop = _steps(make_cfg(f"optim.name={name}", "optim.lr=0.05", "optim.fused=false"))
    moved = max((a - b).abs().max().item() for a, b in zip(fused, _steps(make_cfg(), 0)))
    assert moved > 1e-3  # the steps did something
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_fused_true_without_a_fused_kernel_is_a_config_error(
    make_cfg: Callable[..., Config],
) -> None:
    model = normfree.create_model("nf_resnet_cifar20", num_classes=10)
    with pytest.raises(ConfigError, match=r"optim\.fused=true: .* no fused rmsprop .* or false"):
        B.build_optimizer(make_cfg("optim.name=rmsprop", "optim.fused=true"), model)
    plain = B.build_optimizer(make_cfg("optim.name=rmsprop"), model)  # null: the loop
    assert isinstance(plain, torch.optim.RMSprop)


def test_efficientnet_optimizer_and_schedule(make_cfg: Callable[..., Config]) -> None:
    """``optim.name=rmsprop_tf`` builds TensorFlow's RMSprop with its decay 0.9 (PyTorch's
    RMSprop keeps its 0.99) unless ``optim.alpha`` says otherwise; ``schedule.decay=exponential``
    turns ``decay_epochs`` into steps (0.5 epoch of 10 steps: 5) at ``decay_rate``."""
    model = normfree.create_model("nf_resnet_cifar20", num_classes=10)
    tf = B.build_optimizer(make_cfg("optim.name=rmsprop_tf", "optim.eps=0.001"), model)
    assert {(g["alpha"], g["eps"]) for g in tf.param_groups} == {(0.9, 0.001)}
    plain = B.build_optimizer(make_cfg("optim.name=rmsprop"), model)
    assert plain.param_groups[0]["alpha"] == 0.99
    tuned = B.build_optimizer(make_cfg("optim.name=rmsprop_tf", "optim.alpha=0.95"), model)
    assert tuned.param_groups[0]["alpha"] == 0.95
    cfg = make_cfg("schedule.decay=exponential", "schedule.decay_epochs=0.5",
                   "schedule.decay_rate=0.9", "schedule.warmup_epochs=0")  # fmt: skip
    sched = B.build_scheduler(cfg, tf, steps_per_epoch=10)
    assert (sched.decay_steps, sched.decay_rate, sched.factor(14)) == (5, 0.9, 0.9**2)
    with pytest.raises(ConfigError, match=r"schedule\.decay_rate"):
        make_cfg("schedule.decay_rate=0")
    with pytest.raises(ConfigError, match=r"optim\.alpha"):
        make_cfg("optim.alpha=2")
