"""``msr``: Mean Shift Rejection trains unnormalized ResNets to the accuracy of BN without
minibatch statistics (Ruff, Beck & Bach 2019, arXiv 1911.13173: "higher accuracy than BN
without minibatch statistics"; the paper's numbers are not recorded in the project's
references), compared here with NF-ResNets (Brock et al. 2021a) at the same budget.

Grid: {MSR-ResNet-20, BN-ResNet-20, NF-ResNet-20} × peak learning rate {0.1 (the MSR code's
SGD default), 0.4 (the digits recipe at batch 64)} × seed, the same epochs and batch; each
model's own recipe (MSR projection for MSR, AGC for NF, neither for BN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normfree.experiments.grid import Cell, Experiment, GridOptions, register_experiment
from normfree.experiments.plots import new_figure, plot_lines, save_figure
from normfree.experiments.train_cell import train_cell

__all__ = ["EXPERIMENT", "MODELS"]

MODELS = {"msr": "msr_resnet_cifar20", "bn": "bn_resnet_cifar20", "nf": "nf_resnet_cifar20"}
LABELS = {"msr": "MSR-ResNet-20", "bn": "BN-ResNet-20", "nf": "NF-ResNet-20"}
DATA = "hard-digits"


def _plan(options: GridOptions) -> tuple[list[float], int]:
    return ([0.4], 2) if options.quick else ([0.1, 0.4], 10)


def cells(options: GridOptions) -> list[Cell]:
    lrs, epochs = _plan(options)
    return [
        Cell(f"{m}-lr{lr:g}-s{s}", {"model": m, "lr": lr, "epochs": epochs, "seed": s})
        for m in MODELS
        for lr in lrs
        for s in range(options.seeds)
    ]


def run_cell(cell: Cell, folder: Path, options: GridOptions) -> dict[str, Any]:
    p = cell.params
    overrides = [
        f"model={MODELS[p['model']]}",
        f"seed={p['seed']}",
        "train.batch_size=64",
        f"train.epochs={p['epochs']}",
        f"optim.lr={p['lr']}",
        "schedule.warmup_epochs=0.5",
    ]
    return train_cell(overrides, folder / "run", options.data or DATA, options.threads,
                      curve_every=5)  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path, options: GridOptions) -> None:
    fig, (ax, ax2) = new_figure(2)
    plot_lines(ax, rows, "model", "lr", "val_top1", logx=True, floor=0.0, labels=LABELS)
    ax.set_xlabel("peak learning rate (batch 64)")
    ax.set_ylabel("held-out top-1 (%)  (✕: diverged)")
    ax.set_title(f"same budget ({options.data or DATA})", fontsize=9)
    ax.legend(fontsize=7)
    top = max(r["lr"] for r in rows)
    for r in rows:
        if r["lr"] == top and r.get("seed", 0) == 0 and r.get("curve"):
            pts = [c for c in r["curve"] if c[1] is not None]
            ax2.plot([c[0] for c in pts], [c[1] for c in pts], label=LABELS[r["model"]])
            if r.get("diverged") and r.get("diverged_step"):
                ax2.axvline(r["diverged_step"], color="red", ls=":", lw=1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.set_yscale("log")
    ax2.set_title(f"learning curves at lr {top:g} (red: non-finite)", fontsize=9)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    save_figure(fig, path)


EXPERIMENT = register_experiment(
    Experiment(
        name="msr",
        claim="MSR ResNets train to BN-level accuracy without minibatch statistics",
        cells=cells,
        run_cell=run_cell,
        columns=["val_top1", "val_loss", "train_loss", "diverged", "diverged_step", "steps"],
        plot=plot,
        default_data=DATA,
    )
)
