"""Signal Propagation Plots (Brock, De & Smith 2021a, arXiv 2101.08692, §3).

At each measurement point (the stem output and every residual block output) of a network at
initialisation fed with unit-Gaussian noise, an SPP reports

* ``avg_sq_mean`` = mean over channels c of ``(mean_{N,H,W} x_c)²`` (average squared channel
  mean; grows with depth under "mean shift"),
* ``avg_var`` = mean over channels of the biased variance ``var_{N,H,W} x_c``
  (DeepMind's ``base.signal_metrics``; timm's helpers use the unbiased one),
* ``res_avg_var`` = the same variance of the residual-branch output, before stochastic depth, the
  skip gain and α (the branch is found through ``ResidualBlock.branch_probe`` or named with
  ``branch_points``).

The reductions run over every axis except the channel axis (``channel_dim``, 1 for NCHW).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfree.analysis.context import analysis_mode, make_inputs, model_label
from normfree.analysis.points import PointSpec, default_points, points_from_patterns
from normfree.analysis.recorder import attach_branches, record_points
from normfree.analysis.result_io import JsonResult, from_fields, read_json
from normfree.atomic import atomic_write_json, atomic_write_text

__all__ = [
    "SPPPoint",
    "SPPResult",
    "channel_stats",
    "resolve_points",
    "save_results",
    "signal_propagation",
    "write_csv",
]

FORMAT_VERSION = 1


def channel_stats(x: torch.Tensor, channel_dim: int = 1) -> tuple[float, float]:
    """``(avg_sq_mean, avg_var)`` of ``x``: per-channel mean and biased variance over all other
    axes (float64), then averaged over channels (Brock et al. 2021a, §3)."""
    if x.dim() < 2:
        raise ValueError(f"need at least (N, C) activations, got shape {tuple(x.shape)}")
    c = x.detach().movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1).double()
    var, mean = torch.var_mean(c, dim=1, correction=0)
    return float(mean.square().mean()), float(var.mean())


@dataclass
class SPPPoint:
    """Statistics at one measurement point (see the module docstring)."""

    index: int
    name: str
    kind: str
    stage: int | None
    is_transition: bool
    avg_sq_mean: float
    avg_var: float
    res_avg_var: float | None = None
    #: values per channel the statistics average over (N·H·W; None in files from before it)
    samples: int | None = None


@dataclass
class SPPResult(JsonResult):
    """A Signal Propagation Plot: one :class:`SPPPoint` per measurement point, in forward order.

    ``label`` names the model in plots; ``config`` records how it was measured (input shape,
    batch size, seed, mode, ``skip_gains_to_one``, input kind).
    """

    label: str
    points: list[SPPPoint]
    config: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.points)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.points]

    @property
    def avg_sq_mean(self) -> list[float]:
        return [p.avg_sq_mean for p in self.points]

    @property
    def avg_var(self) -> list[float]:
        return [p.avg_var for p in self.points]

    @property
    def res_avg_var(self) -> list[float | None]:
        return [p.res_avg_var for p in self.points]

    @property
    def stage_boundaries(self) -> list[int]:
        """Indices of the points that start a new stage (stage index changes)."""
        out = []
        for i in range(1, len(self.points)):
            a, b = self.points[i - 1].stage, self.points[i].stage
            if a is not None and b is not None and a != b:
                out.append(i)
        return out

    def block_points(self) -> list[SPPPoint]:
        """The residual-block points (``kind == "block"``)."""
        return [p for p in self.points if p.kind == "block"]

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "normfree.spp",
            "version": FORMAT_VERSION,
            "label": self.label,
            "config": self.config,
            "stage_boundaries": self.stage_boundaries,
            "points": [asdict(p) for p in self.points],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SPPResult:
        if data.get("format") != "normfree.spp":
            raise ValueError("not a normfree SPP result (missing format 'normfree.spp')")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported SPP format version {data.get('version')!r}")
        return cls(
            label=data["label"],
            points=[from_fields(SPPPoint, p) for p in data["points"]],
            config=dict(data.get("config", {})),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> SPPResult | list[SPPResult]:
        """Read a file written by :meth:`to_json` (one result) or :func:`save_results` (list)."""
        data = read_json(path)
        if isinstance(data, list):
            return [cls.from_dict(d) for d in data]
        return cls.from_dict(data)

    def csv_rows(self) -> list[dict[str, Any]]:
        return [{"label": self.label, **asdict(p)} for p in self.points]

    def to_csv(self, path: str | Path) -> Path:
        """Write one row per point: label, index, name, kind, stage, is_transition, avg_sq_mean,
        avg_var, res_avg_var (empty when not measured), samples (values per channel)."""
        return write_csv([self], path)

    def table(self) -> str:
        """A plain-text table of the points."""
        lines = [f"{self.label}", f"{'#':>4} {'point':40s} {'stage':>5} "
                 f"{'avg_sq_mean':>12} {'avg_var':>12} {'res_avg_var':>12}"]  # fmt: skip
        for p in self.points:
            res = f"{p.res_avg_var:12.4g}" if p.res_avg_var is not None else f"{'-':>12}"
            stage = "-" if p.stage is None else str(p.stage)
            mark = "*" if p.is_transition else " "
            lines.append(
                f"{p.index:>4} {p.name[:39] + mark:40s} {stage:>5} "
                f"{p.avg_sq_mean:12.4g} {p.avg_var:12.4g} {res}"
            )
        return "\n".join(lines)


def _result_list(results: SPPResult | Sequence[SPPResult]) -> list[SPPResult]:
    items = [results] if isinstance(results, SPPResult) else list(results)
    for r in items:
        if not isinstance(r, SPPResult):
            raise TypeError(f"expected SPPResult objects, got {type(r).__name__}")
    return items


def write_csv(results: SPPResult | Sequence[SPPResult], path: str | Path) -> Path:
    """Write one or several results to one CSV file (a ``label`` column tells them apart)."""
    results = _result_list(results)
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=["label", *SPPPoint.__dataclass_fields__])
    writer.writeheader()
    for result in results:
        for row in result.csv_rows():
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue())


def save_results(results: SPPResult | Sequence[SPPResult], path: str | Path) -> Path:
    """Write one or several results to one JSON file (a list); read back with
    ``SPPResult.from_json``."""
    return atomic_write_json(path, [r.to_dict() for r in _result_list(results)])


def resolve_points(
    model: nn.Module,
    points: str | Sequence[str] | None = None,
    branch_points: str | Sequence[str] | None = None,
) -> list[PointSpec]:
    """The measurement points: the model's own (:func:`~normfree.analysis.points.default_points`)
    when ``points`` is None, else the modules matched by the globs in ``points``; then the
    residual branches named in ``branch_points`` (see :func:`signal_propagation`)."""
    specs = default_points(model) if points is None else points_from_patterns(model, points)
    if isinstance(branch_points, str):
        branch_points = [branch_points]
    return attach_branches(model, specs, branch_points)


def signal_propagation(
    model: nn.Module,
    inputs: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    points: str | Sequence[str] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    skip_gains_to_one: bool = False,
    device: torch.device | str | None = None,
    branch_points: str | Sequence[str] | None = None,
    mode: str = "train",
    channel_dim: int = 1,
    label: str | None = None,
) -> SPPResult:
    """Measure a Signal Propagation Plot of ``model`` (Brock et al. 2021a, §3).

    Args:
        model: any module. For normfree models the points are the stem and every residual
            block (with ``res_avg_var`` from ``branch_probe``); for other models residual blocks
            are found by :func:`~normfree.analysis.points.find_residual_blocks`, or named.
        inputs: a real batch (used as is). Default: seeded unit-Gaussian noise.
        input_shape: shape of one example, e.g. ``(3, 32, 32)`` (normfree models default to
            ``(in_chans, meta.test_size, meta.test_size)``).
        points: module names or globs (``*`` does not cross dots, ``**`` does).
        batch_size: examples in the noise batch.
        seed: seed of the noise.
        skip_gains_to_one: set SkipInit gains to 1 during the measurement (restored exactly).
        device: optional check that the model is on this device; the analysis runs where the
            model is, and ``inputs`` are moved there.
        branch_points: globs naming the last module of each residual branch of a model that is
            not a normfree model (e.g. ``"layer?.*.bn2"`` for torchvision's BasicBlock); each is
            attached to the point that contains it and gives its ``res_avg_var``.
        mode: ``"train"`` (batch statistics, the paper's setting) or ``"eval"``; dropout and
            stochastic depth are off either way, and buffers are restored.
        channel_dim: the channel axis of the activations (1 for NCHW, -1 for channels-last).
        label: the name shown in plots (default: ``meta.name`` or the class name).

    The model's modes, buffers and parameters are unchanged afterwards and no hook stays
    attached, even if the forward pass raises. Runs under ``torch.no_grad()``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    specs = resolve_points(model, points, branch_points)
    x, kind = make_inputs(model, inputs, input_shape, batch_size, seed, device)

    def stats(t: torch.Tensor, name: str) -> tuple[float, float, int]:
        return (*channel_stats(t, channel_dim), t.numel() // max(t.shape[channel_dim], 1))

    def branch_var(t: torch.Tensor, name: str) -> float:
        return channel_stats(t, channel_dim)[1]

    with torch.no_grad(), analysis_mode(model, mode, skip_gains_to_one):
        records, _ = record_points(model, lambda: model(x), specs, stats, branch_var)
    by_name = {s.name: s for s in specs}
    out = []
    for i, (name, rec) in enumerate(records.items()):
        spec = by_name[name]
        sq_mean, var, samples = rec["value"]
        out.append(
            SPPPoint(i, name, spec.kind, spec.stage, spec.is_transition, sq_mean, var,
                     rec["branch"], samples)
        )  # fmt: skip
    bad = [p.name for p in out if not (math.isfinite(p.avg_var) and math.isfinite(p.avg_sq_mean))]
    config = {
        "input": kind,
        "input_shape": list(x.shape[1:]),
        "batch_size": int(x.shape[0]),
        "seed": seed,
        "mode": mode,
        "skip_gains_to_one": bool(skip_gains_to_one),
        "non_finite_points": bad,
    }
    return SPPResult(label or model_label(model), out, config)
