"""``small-batch``: NF-ResNets keep their accuracy at small batch sizes where BatchNorm degrades
(Brock, De & Smith 2021a, Table 2: ImageNet, batch 4, NF-ResNet-50 69.9 % top-1 against 55.7 %
for BN-ResNet-50).

Grid: {NF-ResNet-20, BN-ResNet-20, WS+GN-ResNet-20, converted} × batch {2, 4, 16, 64} × seed,
the same number of epochs at every batch size and the learning rate scaled linearly with the
batch (``optim.lr`` null: ``base_lr · B / 256``).

The "converted" row (``conv-nf``) asks whether a BN architecture made batch-independent by
:mod:`normfree.convert` is as robust to small batches as a network designed without BN: a
post-activation BN-ResNet-20 (He et al. 2016 CIFAR layout, Conv→BN→ReLU,
:func:`normfree.convert.experiment.bn_resnet_small` with three blocks per stage; the ``nf`` mode
needs Conv→BN pairs, which normfree's pre-activation ``bn_resnet*`` do not have) is built with
the run's seed, converted *before training* by :func:`normfree.convert.convert_model` in mode
``"nf"`` (Scaled-WS convs, residual branches ``h + α·g·F(h)`` with a learnable ``g``;
calibrated on :data:`CALIB_IMAGES` training images) and trained like the NF row
(``model=converted:PATH``: AGC with the classifier unclipped).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from normfree.experiments.grid import Cell, Experiment, GridOptions, register_experiment
from normfree.experiments.plots import new_figure, plot_lines, save_figure
from normfree.experiments.train_cell import cell_config, train_cell

if TYPE_CHECKING:
    from normfree.train import Config

__all__ = ["BLOCKS", "CALIB_IMAGES", "CONVERTED", "EXPERIMENT", "MODELS", "convert_at_init"]

MODELS = {
    "nf": "nf_resnet_cifar20",
    "bn": "bn_resnet_cifar20",
    "wsgn": "wsgn_resnet_cifar20",
    "conv-nf": "converted",  # built and converted before training: convert_at_init
}
LABELS = {
    "nf": "NF-ResNet-20",
    "bn": "BN-ResNet-20",
    "wsgn": "WS+GN-ResNet-20",
    "conv-nf": "post-act BN-ResNet-20 → NF (converted at init)",
}
CONVERTED = {"conv-nf": "nf"}  # row → normfree.convert mode
BLOCKS = 3  # basic blocks per stage of the converted post-activation ResNet: 6·3 + 2 = 20 layers
CALIB_IMAGES = 256
DATA = "hard-digits"


def _plan(options: GridOptions) -> tuple[list[str], list[int], int]:
    if options.quick:
        return ["nf", "bn"], [2, 64], 1
    return list(MODELS), [2, 4, 16, 64], 6


def cells(options: GridOptions) -> list[Cell]:
    models, batches, epochs = _plan(options)
    # large batches first: they are the cheapest cells, so a partial grid compares every model
    return [
        Cell(f"{m}-b{b}-s{s}", {"model": m, "batch": b, "epochs": epochs, "seed": s})
        for b in sorted(batches, reverse=True)
        for m in models
        for s in range(options.seeds)
    ]


def _overrides(model: str, p: dict[str, Any]) -> list[str]:
    return [
        f"model={model}",
        f"seed={p['seed']}",
        f"train.batch_size={p['batch']}",
        f"train.epochs={p['epochs']}",
        "schedule.warmup_epochs=0.5",
        "data.eval_batch_size=256",
    ]


def convert_at_init(cfg: Config, mode: str, path: Path) -> dict[str, Any]:
    """Build the post-activation BN-ResNet-20 for the data of run ``cfg`` after seeding as the
    trainer does (seeded globals, then the data, then the model), convert it with ``mode``,
    calibrating on :data:`CALIB_IMAGES` training images drawn with ``cfg.seed``, and write it
    to ``path`` (a source spec, so it loads without unpickling); returns the conversion
    report."""
    from normfree.convert import convert_model, save_converted
    from normfree.convert.experiment import FACTORY, bn_resnet_small
    from normfree.train import builders as B

    B.seed_globals(cfg.seed)
    bundle = B.build_data(cfg)
    kwargs = {"num_classes": bundle.num_classes, "in_chans": bundle.in_chans, "blocks": BLOCKS}
    model = bn_resnet_small(**kwargs)
    gen = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(bundle.train), generator=gen)[:CALIB_IMAGES].tolist()
    calib = torch.stack([bundle.train[i][0] for i in pick])
    converted = convert_model(model, mode, calib, source=FACTORY, source_kwargs=kwargs)
    save_converted(converted, path)
    return converted.report.to_dict()


def run_cell(cell: Cell, folder: Path, options: GridOptions) -> dict[str, Any]:
    p = cell.params
    data = options.data or DATA
    run_dir = folder / "run"
    if p["model"] not in CONVERTED:
        return train_cell(_overrides(MODELS[p["model"]], p), run_dir, data, options.threads)
    path = folder / "converted.pt"
    overrides = _overrides(f"converted:{path}", p)
    report = convert_at_init(cell_config(overrides, run_dir, data), CONVERTED[p["model"]], path)
    result = train_cell(overrides, run_dir, data, options.threads)
    return {**result, "conversion_rel_error": report.get("rel_error")}


def plot(rows: list[dict[str, Any]], path: Path, options: GridOptions) -> None:
    fig, (ax,) = new_figure()
    plot_lines(ax, rows, "model", "batch", "val_top1", logx=True, floor=0.0, labels=LABELS)
    ax.set_xlabel("batch size (lr ∝ batch)")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(f"accuracy vs batch size ({options.data or DATA})", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


EXPERIMENT = register_experiment(
    Experiment(
        name="small-batch",
        claim="NF-ResNets keep their accuracy at small batch sizes where BN-ResNets degrade",
        cells=cells,
        run_cell=run_cell,
        columns=["val_top1", "val_loss", "train_loss", "diverged", "steps"],
        plot=plot,
        default_data=DATA,
    )
)
