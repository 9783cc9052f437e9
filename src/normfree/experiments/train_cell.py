"""One training cell: a :func:`normfree.train.train` run from ``key=value`` overrides, reduced to
the numbers an experiment tabulates (held-out top-1 and loss, training loss, divergence, the
learning curve)."""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from normfree.train import Config

__all__ = ["BASE_OVERRIDES", "cell_config", "train_cell"]

# every experiment's training runs: quiet, single-threaded, raw weights evaluated (no EMA: the
# claims are about the trained weights, and short runs would evaluate a lagging average)
BASE_OVERRIDES = [
    "data.crop=none",
    "ema.enabled=false",
    "log.progress=false",
    "log.tensorboard=false",
    "log.plot=false",
    "log.csv=false",
    "train.label_smoothing=0.0",
]


def _finite_or_none(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def cell_config(
    overrides: list[str], run_dir: Path, data: str, threads: int = 1, curve_every: int = 0
) -> Config:
    """The trainer config of a cell: the ``digits`` recipe with ``BASE_OVERRIDES``, the data
    spec, the thread count and the experiment's ``overrides``, writing into ``run_dir``."""
    from normfree.train import resolve_config

    items = [*BASE_OVERRIDES, f"data.spec={data}", f"train.threads={threads}", *overrides,
             f"out_dir={run_dir}"]  # fmt: skip
    if curve_every:
        items.append(f"log.every_steps={curve_every}")
    return resolve_config("digits", overrides=items)


def train_cell(
    overrides: list[str], run_dir: Path, data: str, threads: int = 1, curve_every: int = 0
) -> dict[str, Any]:
    """Train the ``digits`` recipe with ``BASE_OVERRIDES + overrides`` on ``data`` into
    ``run_dir`` and return ``val_top1``/``val_loss``/``train_loss`` of the last evaluation
    (``None`` when the run diverged first), ``diverged`` (a non-finite loss stopped it),
    ``diverged_step``, ``steps`` and, with ``curve_every > 0``, ``curve``: ``[step, loss]``
    pairs of the logged training losses (``loss`` ``None`` where non-finite)."""
    from normfree.train import NonFiniteLossError, train
    from normfree.train.run_logger import read_metrics

    cfg = cell_config(overrides, run_dir, data, threads, curve_every)
    logger = logging.getLogger("normfree.train")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the grid prints one line per cell instead
    t0 = time.perf_counter()
    diverged, diverged_step = False, None
    try:
        train(cfg)
    except NonFiniteLossError as e:
        diverged = True
        found = re.search(r"at step (\d+)", str(e))
        diverged_step = int(found.group(1)) if found else None
    finally:
        logger.setLevel(level)
    records = read_metrics(run_dir / "metrics.jsonl")
    epochs = [r for r in records if r.get("kind") == "epoch"]
    steps = [r for r in records if r.get("kind") == "step"]
    last = epochs[-1] if epochs else {}
    result: dict[str, Any] = {
        "val_top1": None if diverged else _finite_or_none(last.get("val_top1")),
        "val_loss": None if diverged else _finite_or_none(last.get("val_loss")),
        "train_loss": None if diverged else _finite_or_none(last.get("train_loss")),
        "diverged": diverged,
        "steps": int(max([r.get("step", 0) for r in records], default=0)),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if diverged:
        result["diverged_step"] = diverged_step
    if curve_every:
        result["curve"] = [[int(r["step"]), _finite_or_none(r.get("loss"))] for r in steps]
    return result
