"""Recipe hints and weight initialisation: MSR from the model's metadata, ``init_from``
fine-tuning, and the reduced-resolution train-then-fine-tune option (Masters et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from normfree.nn.msr import kernel_slice_means
from normfree.optim import AGC, MeanShiftRejection, attached
from normfree.train import Config, load_checkpoint, train
from normfree.train import builders as B

SHORT = ["train.epochs=1", "train.max_steps_per_epoch=4", "train.batch_size=32"]


def test_msr_models_get_the_projection_and_stay_zero_mean(
    make_cfg: Callable[..., Config],
) -> None:
    cfg = make_cfg("model=msr_resnet_cifar20", *SHORT)
    model = B.build_model(B.model_args(cfg, 10, 1))
    opt = B.build_optimizer(cfg, model)
    assert [type(a) for a in attached(opt)] == [MeanShiftRejection]
    train(cfg)
    state = load_checkpoint(Path(cfg.out_dir) / "last.pt")["model"]
    k3 = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 4 and v.shape[-1] == 3]
    assert k3 and max(kernel_slice_means(w).abs().max().item() for w in k3) < 1e-6
    # an NF model takes AGC and no MSR unless asked
    nf = make_cfg(*SHORT)
    nf_opt = B.build_optimizer(nf, B.build_model(B.model_args(nf, 10, 1)))
    assert [type(a) for a in attached(nf_opt)] == [AGC]
    forced = make_cfg(*SHORT, "optim.msr=true", "optim.name=adamw")
    forced_opt = B.build_optimizer(forced, B.build_model(B.model_args(forced, 10, 1)))
    (msr,) = [a for a in attached(forced_opt) if isinstance(a, MeanShiftRejection)]
    assert msr.mode == "project_update"


def test_init_from_loads_raw_or_ema_weights(make_cfg: Callable[..., Config]) -> None:
    first = make_cfg(*SHORT, out="first")
    train(first)
    ckpt = load_checkpoint(Path(first.out_dir) / "best.pt")
    for use_ema, expected in ((False, ckpt["model"]), (True, ckpt["ema"]["module"])):
        cfg = make_cfg(*SHORT, f"init_from={first.out_dir}", f"init_use_ema={str(use_ema).lower()}")
        model = B.build_model(B.model_args(cfg, 10, 1))
        B.init_weights_from(cfg, model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, expected[k]), k


def test_reduced_resolution_then_finetune(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg(*SHORT, "train.finetune_epochs=1", "train.finetune_size=12")
    summary = train(cfg)
    ft_dir = Path(cfg.out_dir) / "finetune"
    assert summary["status"] == "completed" and summary["finetune"]["status"] == "completed"
    ft_cfg = yaml.safe_load((ft_dir / "config.yaml").read_text())
    assert ft_cfg["data"]["image_size"] == 12 and ft_cfg["data"]["test_size"] == 12
    assert ft_cfg["init_from"] == str(Path(cfg.out_dir) / "last.pt")
    assert ft_cfg["train"]["finetune_epochs"] == 0 and ft_cfg["schedule"]["warmup_steps"] == 0
    peak = B.peak_lr(cfg)
    assert abs(ft_cfg["optim"]["lr"] - 0.1 * peak) < 1e-12
    assert (ft_dir / "last.pt").is_file() and 0 <= summary["finetune"]["val_top1"] <= 100
