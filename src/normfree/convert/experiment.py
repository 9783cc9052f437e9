"""The conversion experiment of docs/convert.md (``normfree convert-experiment``).

1. Train a small post-activation BN ResNet (:func:`bn_resnet_small`: Conv→BN→ReLU stem and
   basic blocks, He et al. 2016) on a dataset (default: the bundled 8×8 digits) at batch 64.
2. Convert it with every mode (:data:`normfree.convert.MODES`), calibrating on training images.
3. Fine-tune the BN original and each converted model for the same number of steps at each
   batch size (default 2, 8, 64): SGD with momentum; AGC (Brock et al. 2021b) on the converted
   models with the classifier unclipped (``build_param_groups``), none on the BN model (as the
   BN baselines' recipe); the BN model trains with batch statistics, as BN does.
4. Record held-out top-1 (eval mode) along the way; write a JSON, a figure and a Markdown table.

Self-contained (its own small loop, no ``normfree.train``), so that it can be registered as an
``normfree experiment`` grid later.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normfree.convert.api import convert_model, measure_conversion
from normfree.convert.modes import MODES

__all__ = ["ExperimentConfig", "bn_resnet_small", "results_table", "run_experiment"]

FACTORY = "normfree.convert.experiment:bn_resnet_small"


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


def bn_resnet_small(
    num_classes: int = 10, in_chans: int = 1, width: int = 16, blocks: int = 1
) -> nn.Module:
    """A small post-activation BN ResNet (three stages of ``blocks`` basic blocks, widths
    ``width·(1, 2, 4)``, strides 1, 2, 2) for small images."""
    layers: list[nn.Module] = [nn.Conv2d(in_chans, width, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU()]  # fmt: skip
    cin = width
    for stage, mult in enumerate((1, 2, 4)):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            layers.append(_BasicBlock(cin, width * mult, stride))
            cin = width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


@dataclass
class ExperimentConfig:
    """Settings of :func:`run_experiment` (defaults: the docs/convert.md run)."""

    data: str = "digits"
    width: int = 16
    blocks: int = 1
    pretrain_steps: int = 300
    pretrain_batch: int = 64
    pretrain_lr: float = 0.1
    finetune_steps: int = 150
    batch_sizes: Sequence[int] = (2, 8, 64)
    finetune_lr: float = 0.01
    clipping: float = 0.05
    eval_every: int = 25
    calib_images: int = 256
    modes: Sequence[str] = field(default_factory=lambda: list(MODES))
    seed: int = 0

    def __post_init__(self) -> None:
        counts = {"width": self.width, "blocks": self.blocks, "pretrain_steps": self.pretrain_steps,
                  "pretrain_batch": self.pretrain_batch, "finetune_steps": self.finetune_steps,
                  "eval_every": self.eval_every, "calib_images": self.calib_images}  # fmt: skip
        counts.update({f"batch_sizes[{i}]": b for i, b in enumerate(self.batch_sizes)})
        for name, value in counts.items():
            low = 0 if name.endswith("_steps") else 1  # 0 steps: convert only, no fine-tune
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not self.batch_sizes:
            raise ValueError("batch_sizes must name at least one batch size")
        for name in ("pretrain_lr", "finetune_lr", "clipping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            ):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _stack(dataset: Any) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean()) * 100
    model.train(was)
    return acc


@torch.no_grad()
def _batch_stat_accuracy(bn: nn.Module, x: Tensor, y: Tensor, batch: int) -> float:
    """Top-1 of the BN model normalising with the statistics of each test batch of ``batch``
    (train-mode BN, a copy so the running statistics stay), to show its batch dependence."""
    model = copy.deepcopy(bn).train()
    n = len(x) - len(x) % batch
    hits = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
               for i in range(0, n, batch))  # fmt: skip
    return 100.0 * hits / n


def _optimizer(model: nn.Module, lr: float, clipping: float | None) -> torch.optim.Optimizer:
    from normfree.optim.agc import AGC
    from normfree.optim.param_groups import build_param_groups

    groups = build_param_groups(model, lr=lr, weight_decay=5e-5, clipping=clipping)
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if clipping is not None:
        AGC(opt, clipping=clipping, exclude=())  # a step pre-hook on the optimizer itself
    return opt


def _train(
    model: nn.Module, x: Tensor, y: Tensor, steps: int, batch: int, lr: float,
    clipping: float | None, seed: int, evaluate: Any = None, every: int = 0,
) -> list[tuple[int, float]]:  # fmt: skip
    """Plain SGD steps over shuffled epochs; ``evaluate()`` at step 0 and every ``every``."""
    g = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, lr, clipping)
    curve = [(0, evaluate())] if evaluate else []
    order = torch.randperm(len(x), generator=g)
    pos = 0
    model.train()
    for step in range(1, steps + 1):
        if pos + batch > len(x):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if evaluate and (step % every == 0 or step == steps):
            curve.append((step, evaluate()))
    return curve


def run_experiment(cfg: ExperimentConfig, log: Any = print) -> dict[str, Any]:
    """Run the experiment (see the module docstring); returns a JSON-able result."""
    from normfree.data import build_datasets

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    bundle = build_datasets(cfg.data, augment=None, seed=cfg.seed)
    xtr, ytr = _stack(bundle.train)
    xva, yva = _stack(bundle.val)
    kwargs = {"num_classes": bundle.num_classes, "in_chans": bundle.in_chans,
              "width": cfg.width, "blocks": cfg.blocks}  # fmt: skip
    bn = bn_resnet_small(**kwargs)
    _train(bn, xtr, ytr, cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_lr, None, cfg.seed)
    bn.eval()
    base = _accuracy(bn, xva, yva)
    log(f"BN model trained: held-out top-1 {base:.2f}% ({time.perf_counter() - t0:.0f}s)")
    calib = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1))
                [: cfg.calib_images]]  # fmt: skip
    models: dict[str, nn.Module] = {"bn": bn}
    reports: dict[str, Any] = {}
    for mode in cfg.modes:
        conv = convert_model(bn, mode, calib, source=FACTORY, source_kwargs=kwargs)
        models[mode] = conv
        reports[mode] = conv.report.to_dict()
        reports[mode]["held_out"] = measure_conversion(bn, conv, xva)
        log(conv.report.summary())
    batch_stats = {str(b): _batch_stat_accuracy(bn, xva, yva, b) for b in cfg.batch_sizes}
    log(f"BN model with batch statistics at test time: {batch_stats}")
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, model in models.items():
        curves[name] = {}
        for b in cfg.batch_sizes:
            m = copy.deepcopy(model)
            clip = None if name == "bn" else cfg.clipping
            curve = _train(m, xtr, ytr, cfg.finetune_steps, b, cfg.finetune_lr, clip,
                           cfg.seed + b, lambda m=m: _accuracy(m, xva, yva),
                           cfg.eval_every)  # fmt: skip
            curves[name][str(b)] = curve
            log(f"{name:8s} batch {b:3d}: {curve[0][1]:6.2f}% → {curve[-1][1]:6.2f}%")
    config = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in asdict(cfg).items()}
    return {
        "config": config,
        "dataset": {"name": bundle.name, "train": len(xtr), "val": len(xva)},
        "bn_accuracy": base,
        "bn_batch_stat_accuracy": batch_stats,
        "reports": reports,
        "curves": curves,
        "seconds": time.perf_counter() - t0,
    }


def results_table(result: dict[str, Any]) -> str:
    """Markdown table: conversion error and agreement on the held-out set, held-out top-1 at
    conversion (step 0) and after fine-tuning at each batch size; then the BN model's held-out
    top-1 when it normalises with test-batch statistics at each batch size."""
    sizes = result["config"]["batch_sizes"]
    steps = result["config"]["finetune_steps"]
    head = ("| model | rel. logit error (held-out) | top-1 agreement with BN | top-1 at step 0 | "
            + " | ".join(f"after {steps} steps @ batch {b}" for b in sizes) + " |")  # fmt: skip
    lines = [head, "|" + "---|" * (4 + len(sizes))]
    for name, per_batch in result["curves"].items():
        report = result["reports"].get(name)
        if report is None:
            err, agree = "0 (original)", "100%"
        else:
            held = report["held_out"]
            err, agree = f"{held['rel_error']:.3g}", f"{100 * held['top1_agreement']:.1f}%"
        start = per_batch[str(sizes[0])][0][1]
        ends = " | ".join(f"{per_batch[str(b)][-1][1]:.2f}%" for b in sizes)
        lines.append(f"| {name} | {err} | {agree} | {start:.2f}% | {ends} |")
    stats = result.get("bn_batch_stat_accuracy") or {}
    if stats:
        lines += ["", "| BN model, test-batch statistics | " + " | ".join(
            f"batch {b}" for b in sizes) + " |", "|" + "---|" * (1 + len(sizes)),
            "| held-out top-1 | " + " | ".join(f"{stats[str(b)]:.2f}%" for b in sizes)
            + " |"]  # fmt: skip
    return "\n".join(lines)


def plot_results(result: dict[str, Any], path: str) -> None:
    """Held-out top-1 against fine-tuning steps, one panel per batch size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError('the figure needs matplotlib: pip install "normfree[plots]"') from e
    from normfree.atomic import atomic_save_figure

    sizes = result["config"]["batch_sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.4), sharey=True)
    for ax, b in zip(axes if len(sizes) > 1 else [axes], sizes):
        for name, per_batch in result["curves"].items():
            steps, acc = zip(*per_batch[str(b)])
            ax.plot(steps, acc, marker="o", ms=3, label=name,
                    ls="--" if name == "bn" else "-")  # fmt: skip
        ax.set_title(f"fine-tuning at batch {b}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    (axes[0] if len(sizes) > 1 else axes).set_ylabel("held-out top-1 (%)")
    (axes[-1] if len(sizes) > 1 else axes).legend()
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)
