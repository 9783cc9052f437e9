"""``depth``: initialisations that train very deep residual networks without normalization
(Fixup: Zhang et al. 2019, §4 / Table 1, ResNet-110 and 1202 layers on CIFAR-10 without
normalization; SkipInit: De & Smith 2020, §4; ReZero: Bachlechner et al. 2020; NF-ResNets:
Brock et al. 2021a) against BN and a plain He-initialised unnormalized ResNet, whose forward
signal grows ×2 per block (De & Smith 2020, §3) and overflows at 1,000+ layers.

Grid: {Fixup, SkipInit, ReZero, NF-ResNet, BN-ResNet, He-init (no norm, residual gain 1)} ×
depth {20, 110, 1202} × seed, all with the small-image layout (``depths = 3 × (D−2)/6``), the
same SGD budget (steps, batch, learning rate 0.1 with a 5-step warmup), each model's own clipping
recipe (AGC for NF-ResNets only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normfree.experiments.grid import Cell, Experiment, GridOptions, register_experiment
from normfree.experiments.plots import new_figure, plot_lines, save_figure
from normfree.experiments.train_cell import train_cell

__all__ = ["EXPERIMENT", "FAMILIES"]

# family -> (registered depth-20 model whose ``depths`` the grid overrides, extra model options)
FAMILIES: dict[str, tuple[str, str]] = {
    "fixup": ("fixup_resnet_cifar20", ""),
    "skipinit": ("skipinit_resnet_cifar20", ""),
    "rezero": ("rezero_resnet_cifar20", ""),
    "nf": ("nf_resnet_cifar20", ""),
    "bn": ("bn_resnet_cifar20", ""),
    "he": ("skipinit_resnet_cifar20", ", skipinit_init: 1.0"),
}
LABELS = {"fixup": "Fixup", "skipinit": "SkipInit", "rezero": "ReZero", "nf": "NF-ResNet",
          "bn": "BN-ResNet", "he": "He init, no norm"}  # fmt: skip
DATA = "hard-digits"


def _plan(options: GridOptions) -> tuple[list[str], list[int], int]:
    if options.quick:
        return ["skipinit", "he"], [20, 1202], 4
    return list(FAMILIES), [20, 110, 1202], 30


def cells(options: GridOptions) -> list[Cell]:
    families, depths, steps = _plan(options)
    return [
        Cell(f"{f}-d{d}-s{s}", {"family": f, "depth": d, "budget_steps": steps, "seed": s})
        for f in families
        for d in depths
        for s in range(options.seeds)
    ]


def run_cell(cell: Cell, folder: Path, options: GridOptions) -> dict[str, Any]:
    p = cell.params
    name, extra = FAMILIES[p["family"]]
    n = (p["depth"] - 2) // 6
    overrides = [
        f"model={name}",
        f"model_kwargs={{depths: [{n}, {n}, {n}]{extra}}}",
        f"seed={p['seed']}",
        "train.batch_size=32",
        "train.epochs=1",
        f"train.max_steps_per_epoch={p['budget_steps']}",
        "optim.lr=0.1",
        "schedule.warmup_steps=5",
        "data.eval_batch_size=128",
    ]
    return train_cell(overrides, folder / "run", options.data or DATA, options.threads)


def plot(rows: list[dict[str, Any]], path: Path, options: GridOptions) -> None:
    fig, (ax, ax2) = new_figure(2)
    for a, key, floor in ((ax, "val_loss", None), (ax2, "val_top1", 0.0)):
        plot_lines(a, rows, "family", "depth", key, logx=True, floor=floor, labels=LABELS)
        a.set_xlabel("depth (layers)")
    steps = rows[0]["budget_steps"]
    ax.set_ylabel("held-out loss  (✕: diverged)")
    ax2.set_ylabel("held-out top-1 (%)")
    ax.set_title(f"after {steps} SGD steps ({options.data or DATA})", fontsize=9)
    ax2.legend(fontsize=7)
    save_figure(fig, path)


EXPERIMENT = register_experiment(
    Experiment(
        name="depth",
        claim="Fixup/SkipInit/ReZero/NF-ResNets train at 1,000+ layers; a plain He-init ResNet "
        "does not",
        cells=cells,
        run_cell=run_cell,
        columns=["val_loss", "val_top1", "train_loss", "diverged", "diverged_step", "steps"],
        plot=plot,
        default_data=DATA,
    )
)
