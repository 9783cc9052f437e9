"""Figures of the analysis results (matplotlib, the optional ``plot`` extra).

* :func:`plot_spp` - Signal Propagation Plots as in Brock et al. 2021a, Fig. 1–2: three panels
  (average squared channel mean, average channel variance, residual-branch variance) against the
  point index (0 = stem), several models overlaid, stage boundaries dotted.
* :func:`plot_moments` - χ against depth (log scale) with the growth verdict (Labatie 2019).
* :func:`plot_power` - shares of the power decomposition against depth (Labatie et al. 2021).

Figures are drawn with the object-oriented API (no pyplot state, works headless).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normfree.analysis.moments import MomentsResult
from normfree.analysis.power import PowerResult
from normfree.analysis.spp import SPPResult
from normfree.atomic import atomic_save_figure

__all__ = ["check_figure_path", "plot_moments", "plot_power", "plot_spp"]

_STYLES = ("-", "--", "-.", ":")  # overlapping curves stay visible


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised with matplotlib hidden
        raise ImportError(
            "plotting needs matplotlib: pip install 'normfree[plot]' (or pip install matplotlib)"
        ) from err
    return Figure


def _figure(ncols: int, width: float = 4.6, height: float = 3.6) -> tuple[Any, Any]:
    fig = _figure_class()(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def check_figure_path(path: str | Path) -> None:
    """Fail early when matplotlib is missing or cannot draw the image format of ``path`` (its
    suffix; PNG when there is none): ``ImportError`` / ``ValueError`` naming the fix. Call it
    before a long analysis whose figure goes to ``path``."""
    _figure_class()
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        others = ", ".join(sorted(supported))
        raise ValueError(f"cannot draw a figure as {path}: matplotlib does not write '.{fmt}' "
                         f"files; use .png, .pdf or .svg (or one of {others})")  # fmt: skip


def _labels(results: Sequence[Any], labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return [r.label for r in results]
    if len(labels) != len(results):
        raise ValueError(f"got {len(labels)} labels for {len(results)} results")
    return list(labels)


def _as_list(results: Any, kind: type) -> list[Any]:
    items = [results] if isinstance(results, kind) else list(results)
    if not items:
        raise ValueError("nothing to plot")
    for r in items:
        if not isinstance(r, kind):
            raise TypeError(f"expected {kind.__name__} objects, got {type(r).__name__}")
    return items


def _save(fig: Any, path: str | Path | None, dpi: int) -> None:
    if path is not None:
        atomic_save_figure(fig, path, dpi=dpi)


def plot_spp(
    results: SPPResult | Sequence[SPPResult],
    path: str | Path | None = None,
    labels: Sequence[str] | None = None,
    log_scale: bool = False,
    title: str | None = None,
    dpi: int = 120,
) -> Any:
    """Draw (and with ``path``, save as PNG) the SPPs of one or several models.

    Panels: ``avg_sq_mean``, ``avg_var``, ``res_avg_var`` against the point index; the stage
    boundaries are dotted vertical lines (grey when all results share them, else in each
    result's colour). ``log_scale`` puts the y axes on a log scale, except a panel with no
    positive value (all-zero branches of Fixup), which stays linear and says so. Returns the
    matplotlib ``Figure``.
    """
    items = _as_list(results, SPPResult)
    names = _labels(items, labels)
    fig, axes = _figure(3)
    panels = [("avg_sq_mean", "Average squared channel mean"),
              ("avg_var", "Average channel variance"),
              ("res_avg_var", "Residual-branch variance")]  # fmt: skip
    for k, (result, name) in enumerate(zip(items, names)):
        colour = f"C{k % 10}"
        for ax, (attr, _) in zip(axes, panels):
            values = getattr(result, attr)
            xs = [p.index for p, v in zip(result.points, values) if v is not None]
            ys = [v for v in values if v is not None]
            if ys:
                ax.plot(xs, ys, marker=".", color=colour, linestyle=_STYLES[k % 4], label=name)
    same = all(r.stage_boundaries == items[0].stage_boundaries for r in items)
    for k, result in enumerate(items):
        if same and k > 0:
            break
        for ax in axes:
            for b in result.stage_boundaries:
                ax.axvline(b - 0.5, color="0.4" if same else f"C{k % 10}", linestyle=":",
                           linewidth=0.9)  # fmt: skip
    for ax, (attr, heading) in zip(axes, panels):
        ax.set_title(heading)
        ax.set_xlabel("point (0 = stem, then residual blocks)")
        positive = any(v is not None and v > 0 for r in items for v in getattr(r, attr))
        if log_scale and positive:  # values ≤ 0 are left out of a log axis
            ax.set_yscale("log")
        elif log_scale:  # e.g. Fixup's all-zero branches: a log axis would be empty
            ax.text(0.5, 0.5, "no positive values: linear scale", transform=ax.transAxes,
                    ha="center", va="center", color="0.4")  # fmt: skip
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    _save(fig, path, dpi)
    return fig


def plot_moments(
    results: MomentsResult | Sequence[MomentsResult],
    path: str | Path | None = None,
    labels: Sequence[str] | None = None,
    dpi: int = 120,
) -> Any:
    """χ against depth (log y; left) and against log depth (right) for several results, with each
    result's growth verdict in its legend entry (Labatie 2019, Figs. 3–5)."""
    items = _as_list(results, MomentsResult)
    names = _labels(items, labels)
    fig, axes = _figure(2)
    for k, (result, name) in enumerate(zip(items, names)):
        pts = [p for p in result.points if p.depth > 0]
        depth, chi = [p.depth for p in pts], [p.chi for p in pts]
        if result.fit is not None:
            f = result.fit
            name = f"{name}: {f.verdict} (R² exp {f.exp_r2:.3f}, pow {f.pow_r2:.3f})"
        for ax in axes:
            ax.plot(depth, chi, marker=".", color=f"C{k % 10}", label=name)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("depth l")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("depth l (log)")
    for ax in axes:
        ax.set_ylabel("normalized sensitivity χ")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize="small")
    _save(fig, path, dpi)
    return fig


def plot_power(
    results: PowerResult | Sequence[PowerResult],
    path: str | Path | None = None,
    labels: Sequence[str] | None = None,
    dpi: int = 120,
) -> Any:
    """Share of E[y²] in channel-wise means (left) and in instance variability (right) against
    depth, for several results (Labatie et al. 2021, Fig. 2)."""
    items = _as_list(results, PowerResult)
    names = _labels(items, labels)
    fig, axes = _figure(2)
    for k, (result, name) in enumerate(zip(items, names)):
        xs = [p.index + 1 for p in result.points]
        style = {"marker": ".", "color": f"C{k % 10}", "linestyle": _STYLES[k % 4], "label": name}
        axes[0].plot(xs, result.channel_mean_share, **style)
        axes[1].plot(xs, result.instance_share, **style)
    axes[0].set_title("channel-mean power E_c[μ_c²] / E[y²]")
    axes[1].set_title("instance power E_c[Var_x μ_c(x)] / E[y²]")
    axes[0].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    _save(fig, path, dpi)
    return fig
