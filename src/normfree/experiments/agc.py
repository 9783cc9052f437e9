"""``agc``: Adaptive Gradient Clipping lets NF-ResNets train at large batch sizes and learning
rates where unclipped training diverges (Brock et al. 2021b, §4: AGC makes large batches and
strong augmentation stable without BN; the NFNet recipe trains at batch 4096, peak lr 1.6,
λ = 0.01; global-norm clipping (Pascanu et al. 2013) is sensitive to its threshold).

Grid: NF-ResNet-20 at batch 256 × learning rate × {no clipping, global-norm clipping at
‖G‖ ≤ 1, AGC λ = 0.01, AGC λ = 0.1} × seed; the learning curves are logged at every step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normfree.experiments.grid import Cell, Experiment, GridOptions, register_experiment
from normfree.experiments.plots import new_figure, plot_lines, save_figure
from normfree.experiments.train_cell import train_cell

__all__ = ["CLIPPING", "EXPERIMENT"]

MODEL = "nf_resnet_cifar20"
BATCH = 256
DATA = "hard-digits"
# setting -> trainer overrides
CLIPPING: dict[str, list[str]] = {
    "none": ["optim.agc=false"],
    "gnorm1": ["optim.agc=false", "optim.clip_grad_norm=1.0"],
    "agc0.01": ["optim.agc=true", "optim.clipping=0.01"],
    "agc0.1": ["optim.agc=true", "optim.clipping=0.1"],
}
LABELS = {"none": "no clipping", "gnorm1": "global norm ≤ 1", "agc0.01": "AGC λ=0.01",
          "agc0.1": "AGC λ=0.1"}  # fmt: skip


def _plan(options: GridOptions) -> tuple[list[str], list[float], int]:
    if options.quick:
        return ["none", "agc0.01"], [3.2], 4
    return list(CLIPPING), [0.1, 0.4, 1.6, 6.4], 8


def cells(options: GridOptions) -> list[Cell]:
    settings, lrs, epochs = _plan(options)
    return [
        Cell(f"{c}-lr{lr:g}-s{s}", {"clipping": c, "lr": lr, "epochs": epochs, "seed": s})
        for c in settings
        for lr in lrs
        for s in range(options.seeds)
    ]


def run_cell(cell: Cell, folder: Path, options: GridOptions) -> dict[str, Any]:
    p = cell.params
    overrides = [
        f"model={MODEL}",
        f"seed={p['seed']}",
        f"train.batch_size={BATCH}",
        f"train.epochs={p['epochs']}",
        f"optim.lr={p['lr']}",
        "schedule.warmup_steps=4",
        *CLIPPING[p["clipping"]],
    ]
    return train_cell(overrides, folder / "run", options.data or DATA, options.threads,
                      curve_every=1)  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path, options: GridOptions) -> None:
    fig, (ax, ax2) = new_figure(2)
    plot_lines(ax, rows, "clipping", "lr", "val_top1", logx=True, floor=0.0, labels=LABELS)
    ax.set_xlabel(f"peak learning rate (batch {BATCH})")
    ax.set_ylabel("held-out top-1 (%)  (✕: diverged)")
    ax.set_title(f"accuracy vs lr ({options.data or DATA})", fontsize=9)
    ax.legend(fontsize=7)
    top = max(r["lr"] for r in rows)
    for r in rows:
        if r["lr"] == top and r.get("seed", 0) == 0 and r.get("curve"):
            steps = [c[0] for c in r["curve"] if c[1] is not None]
            losses = [c[1] for c in r["curve"] if c[1] is not None]
            ax2.plot(steps, losses, label=LABELS.get(r["clipping"], r["clipping"]))
            if r.get("diverged") and r.get("diverged_step"):
                ax2.axvline(r["diverged_step"], color="red", ls=":", lw=1)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.set_title(f"learning curves at lr {top:g} (red: non-finite)", fontsize=9)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    save_figure(fig, path)


EXPERIMENT = register_experiment(
    Experiment(
        name="agc",
        claim="AGC keeps NF-ResNets training at large batch and lr where unclipped training "
        "diverges",
        cells=cells,
        run_cell=run_cell,
        columns=["val_top1", "val_loss", "train_loss", "diverged", "diverged_step", "steps"],
        plot=plot,
        default_data=DATA,
    )
)
