"""The run folder's records: ``metrics.jsonl``, ``metrics.csv``, ``summary.json``,
TensorBoard events and ``curves.png``.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per line with ``"kind": "step"``
(every ``log.every_steps`` optimizer steps) or ``"kind": "epoch"`` (after each epoch, with the
validation metrics of the raw and EMA weights). On resume, records past the checkpoint's step are
dropped so the file reads like one uninterrupted run. TensorBoard and the PNG are optional
extras: when ``tensorboard`` / ``matplotlib`` is missing a warning is logged and the run goes on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from normfree.atomic import atomic_save_figure, atomic_write_json, atomic_write_text, to_json
from normfree.train.run_folder import open_run_file

__all__ = ["RunLogger", "plot_curves", "read_metrics"]

log = logging.getLogger("normfree.train")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _legend(ax: Any) -> None:
    """A legend where the axes have labelled curves (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def plot_curves(records: list[dict[str, Any]], path: str | Path) -> bool:
    """Training loss, validation accuracy/loss and learning rate against the step, as a PNG.
    Returns False (with a logged warning) when matplotlib is not installed, and False without
    writing a file when ``records`` hold nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping curves.png (pip install normfree[plot])")
        return False
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not steps and not epochs:  # the run ended before its first record: nothing to draw
        log.debug("no metrics recorded yet: skipping curves.png")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    pts = [(r["step"], r["loss"]) for r in steps if _finite(r.get("loss"))]
    if pts:
        ax.plot(*zip(*pts), lw=0.8, label="train (step)")
    for key, label in (("val_loss", "val"), ("ema_val_loss", "val (EMA)")):
        pts = [(r["step"], r[key]) for r in epochs if _finite(r.get(key))]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    _legend(ax)
    ax = axes[1]
    for key, label in (("val_top1", "val"), ("ema_val_top1", "val (EMA)"), ("train_top1", "train")):
        pts = [(r["step"], r[key]) for r in epochs if _finite(r.get(key))]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax.set(xlabel="step", ylabel="top-1 (%)", title="accuracy")
    _legend(ax)
    ax = axes[2]
    pts = [(r["step"], r["lr"]) for r in steps if _finite(r.get("lr"))]
    if pts:
        ax.plot(*zip(*pts))
    ax.set(xlabel="step", ylabel="learning rate", title="schedule")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=100)
    plt.close(fig)
    return True


class RunLogger:
    """Writes the run records (a no-op object on ranks other than 0).

    Args:
        run_dir: the run folder.
        enabled: False on non-zero ranks.
        tensorboard / csv / plot: the optional outputs (``log.*`` config keys).
        resume_step: when resuming, drop ``metrics.jsonl`` records with ``step`` above it, and
            TensorBoard's events after it (``SummaryWriter(purge_step=...)``): the steps between
            the checkpoint and a crash are logged once, by the resumed run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        csv: bool = True,
        plot: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.want_csv, self.want_plot = csv, plot
        self.records: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            kept = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.metrics_path, "".join(to_json(r) + "\n" for r in kept))
            self.records = kept
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT  # appended in place: no link followed
        self._file = os.fdopen(open_run_file(self.metrics_path, flags), "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                         purge_step=purge)  # fmt: skip
            except ImportError:
                log.warning("tensorboard is not installed: skipping TensorBoard logs")

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (``kind`` and ``step`` keys expected)."""
        if not self.enabled:
            return
        self.records.append(record)
        self._file.write(to_json(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = "train" if record.get("kind") == "step" else "epoch"
            for k, v in record.items():
                if k not in ("kind", "step", "epoch") and _finite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, record.get("step", 0))
            self._tb.flush()
        if record.get("kind") == "epoch" and self.want_csv:
            self._write_csv()

    def _write_csv(self) -> None:
        rows = [r for r in self.records if r.get("kind") == "epoch"]
        fields: list[str] = []
        for r in rows:
            fields.extend(k for k in r if k not in fields)
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            atomic_write_json(self.run_dir / "summary.json", summary)

    def plot(self) -> None:
        if self.enabled and self.want_plot:
            plot_curves(self.records, self.run_dir / "curves.png")

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
