"""``small-batch``: NF-ResNets keep their accuracy at small batch sizes where BatchNorm degrades
(Brock, De & Smith 2021a, Table 2: ImageNet, batch 4, NF-ResNet-50 69.9 % top-1 against 55.7 %
for BN-ResNet-50).

Grid: {NF-ResNet-20, BN-ResNet-20, WS+GN-ResNet-20} × batch {2, 4, 16, 64} × seed, the same
number of epochs at every batch size and the learning rate scaled linearly with the batch
(``optim.lr`` null: ``base_lr · B / 256``). A "converted" row (a BN model converted to NF) can be
added to :data:`MODELS` once ``normfree.convert`` exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normfree.experiments.grid import Cell, Experiment, GridOptions, register_experiment
from normfree.experiments.plots import new_figure, plot_lines, save_figure
from normfree.experiments.train_cell import train_cell

__all__ = ["EXPERIMENT", "MODELS"]

MODELS = {"nf": "nf_resnet_cifar20", "bn": "bn_resnet_cifar20", "wsgn": "wsgn_resnet_cifar20"}
LABELS = {"nf": "NF-ResNet-20", "bn": "BN-ResNet-20", "wsgn": "WS+GN-ResNet-20"}
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


def run_cell(cell: Cell, folder: Path, options: GridOptions) -> dict[str, Any]:
    p = cell.params
    overrides = [
        f"model={MODELS[p['model']]}",
        f"seed={p['seed']}",
        f"train.batch_size={p['batch']}",
        f"train.epochs={p['epochs']}",
        "schedule.warmup_epochs=0.5",
        "data.eval_batch_size=256",
    ]
    return train_cell(overrides, folder / "run", options.data or DATA, options.threads)


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
