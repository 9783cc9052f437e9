"""Figures of the experiments: metric-vs-setting lines (seeds averaged, divergence marked) and
curves, written atomically as small PNGs. matplotlib is imported lazily."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normfree.atomic import atomic_save_figure

__all__ = ["aggregate", "new_figure", "plot_lines", "save_figure"]


def new_figure(ncols: int = 1, width: float = 4.4, height: float = 3.3) -> tuple[Any, Any]:
    """A figure with ``ncols`` axes (always a list), Agg backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is an optional dependency
        raise ImportError("figures need matplotlib: pip install matplotlib") from e
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=90)
    plt.close(fig)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def aggregate(
    rows: Sequence[dict[str, Any]], group: str, x: str, y: str
) -> dict[Any, list[tuple[Any, float | None, bool]]]:
    """``{group value: [(x, mean of finite y over seeds or None, any seed diverged)]}``, x
    sorted, groups in first-seen order."""
    cells: dict[Any, dict[Any, list[dict[str, Any]]]] = {}
    for r in rows:
        cells.setdefault(r[group], {}).setdefault(r[x], []).append(r)
    out: dict[Any, list[tuple[Any, float | None, bool]]] = {}
    for g, by_x in cells.items():
        points = []
        for xv in sorted(by_x):
            ys = [float(r[y]) for r in by_x[xv] if _finite(r.get(y))]
            diverged = any(bool(r.get("diverged")) for r in by_x[xv])
            points.append((xv, sum(ys) / len(ys) if ys else None, diverged))
        out[g] = points
    return out


def plot_lines(
    ax: Any,
    rows: Sequence[dict[str, Any]],
    group: str,
    x: str,
    y: str,
    *,
    logx: bool = False,
    floor: float | None = None,
    labels: dict[Any, str] | None = None,
) -> None:
    """One line per ``group`` value of ``y`` against ``x``; cells where a seed diverged get a
    red ✕ (at ``floor`` when no seed gave a finite value; ``None``: above the highest value)."""
    groups = aggregate(rows, group, x, y)
    finite = [p[1] for points in groups.values() for p in points if p[1] is not None]
    lo = floor if floor is not None else 1.05 * max(finite, default=1.0)
    for g, points in groups.items():
        xs = [p[0] for p in points if p[1] is not None]
        ys = [p[1] for p in points if p[1] is not None]
        ax.plot(xs, ys, "o-", ms=4, label=(labels or {}).get(g, str(g)))
        for xv, yv, div in points:
            if div:
                where = yv if yv is not None else lo
                ax.plot([xv], [where], "x", color="red", ms=9, mew=2)
    if logx:
        ax.set_xscale("log", base=2)
        ticks = sorted({r[x] for r in rows})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
