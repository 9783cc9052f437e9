"""``msr``: Mean Shift Rejection trains unnormalized ResNets to the accuracy of BN without
minibatch statistics (Ruff et al. 2019, arXiv 1910.xxxx as cited in shared/reference: MSR
ResNets match their BN counterparts on CIFAR-10), compared here with NF-ResNets (Brock et al.
2021a) at the same budget.

Grid: {MSR-ResNet-20, BN-ResNet-20, NF-ResNet-20} × seed, the same epochs, batch and learning
rate; each model's own recipe (MSR projection for MSR, AGC for NF, neither for BN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normfree.experiments.grid import Cell, Experiment, GridOptions, register_experiment
from normfree.experiments.plots import new_figure, save_figure
from normfree.experiments.train_cell import train_cell

__all__ = ["EXPERIMENT", "MODELS"]

MODELS = {"msr": "msr_resnet_cifar20", "bn": "bn_resnet_cifar20", "nf": "nf_resnet_cifar20"}
LABELS = {"msr": "MSR-ResNet-20", "bn": "BN-ResNet-20", "nf": "NF-ResNet-20"}
DATA = "hard-digits"


def _epochs(options: GridOptions) -> int:
    return 2 if options.quick else 10


def cells(options: GridOptions) -> list[Cell]:
    return [
        Cell(f"{m}-s{s}", {"model": m, "epochs": _epochs(options), "seed": s})
        for m in MODELS
        for s in range(options.seeds)
    ]


def run_cell(cell: Cell, folder: Path, options: GridOptions) -> dict[str, Any]:
    p = cell.params
    overrides = [
        f"model={MODELS[p['model']]}",
        f"seed={p['seed']}",
        "train.batch_size=64",
        f"train.epochs={p['epochs']}",
        "schedule.warmup_epochs=0.5",
    ]
    return train_cell(overrides, folder / "run", options.data or DATA, options.threads,
                      curve_every=5)  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path, options: GridOptions) -> None:
    fig, (ax, ax2) = new_figure(2)
    names = list(dict.fromkeys(r["model"] for r in rows))
    means = []
    for m in names:
        ys = [r["val_top1"] for r in rows if r["model"] == m and r.get("val_top1") is not None]
        means.append(sum(ys) / len(ys) if ys else 0.0)
        ax.scatter([LABELS[m]] * len(ys), ys, color="k", s=12, zorder=3)
    ax.bar([LABELS[m] for m in names], means, color=["C0", "C1", "C2"][: len(names)])
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(f"same budget ({options.data or DATA})", fontsize=9)
    for r in rows:
        if r.get("seed", 0) == 0 and r.get("curve"):
            pts = [c for c in r["curve"] if c[1] is not None]
            ax2.plot([c[0] for c in pts], [c[1] for c in pts], label=LABELS[r["model"]])
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    save_figure(fig, path)


EXPERIMENT = register_experiment(
    Experiment(
        name="msr",
        claim="MSR ResNets train to BN-level accuracy without minibatch statistics",
        cells=cells,
        run_cell=run_cell,
        columns=["val_top1", "val_loss", "train_loss", "diverged", "steps"],
        plot=plot,
        default_data=DATA,
    )
)
