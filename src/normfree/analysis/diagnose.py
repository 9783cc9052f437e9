"""``diagnose``: a plain-words health check of a network's signal propagation at initialisation,
for any PyTorch model (Brock et al. 2021a, §3–4; the failure modes their SPPs reveal).

Checks, with the thresholds of :class:`DiagnoseThresholds` (ratios are dimensionless):

* **mean shift** - at some non-stem point the squared channel mean reaches ``mean_shift_ratio``
  (0.5) × the channel variance (the channel means carry ≥ 1/3 of ``E[x²]``), *and* either that
  ratio grew ≥ ``mean_shift_growth`` (10×) from the first non-stem point or it is
  ≥ ``mean_shift_dominant`` (2: the means dominate outright) there and still at the last point
  (a ratio that peaks once and falls is not the depth-wise drift). Cause: the layers with the
  largest rise of the ratio on the way to its peak (ReLU/Swish outputs have positive means that
  non-zero-mean weights pass on; Scaled WS removes it).
* **exploding / vanishing variance** - ``avg_var`` at some point exceeds ``var_high`` (1e3) or
  falls below ``var_low`` (1e-3) times the input's variance. Cause: the largest one-step jumps.
* **residual branches out of scale** - a branch's output variance exceeds ``branch_to_input``
  (10) × the variance of its block's input (the branch swamps the skip path), or lies more than
  ``branch_spread`` (10×) away from the median branch variance (not steady across depth).
  All-zero branches (Fixup, zero-init last layers) are reported as information only.
* **batch dependence** - an example's output changes by more than ``batch_rtol`` (1e-3,
  relative) when the rest of its batch changes, in train and in eval mode
  (:func:`~normfree.analysis.batch_dependence.batch_dependence`), with the modules responsible.
* **non-finite activations** - NaN or inf at any point.

Points whose statistics average fewer than ``min_samples`` (16) values per channel (N·H·W: a
batch of 1 at a 1×1 map) are left out of the mean-shift, variance and branch checks and named
as information: with n values a zero-mean channel's squared mean over its biased variance is
≈ 1/(n − 1) (1 at n = 2), and its variance reads (1 − 1/n)·σ² (0 at n = 1).

By default the SPP runs with SkipInit gains set to 1 (``skip_gains_to_one``): with zero gains
every block is the identity at initialisation and the checks would see nothing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfree.analysis.batch_dependence import BatchDependence, batch_dependence
from normfree.analysis.context import make_inputs
from normfree.analysis.spp import SPPResult, channel_stats, signal_propagation
from normfree.atomic import atomic_write_json

__all__ = ["DiagnoseThresholds", "Diagnosis", "Finding", "diagnose"]


@dataclass(frozen=True)
class DiagnoseThresholds:
    """Thresholds of :func:`diagnose` (see the module docstring for their meaning)."""

    mean_shift_ratio: float = 0.5
    mean_shift_growth: float = 10.0
    mean_shift_dominant: float = 2.0
    var_high: float = 1e3
    var_low: float = 1e-3
    branch_to_input: float = 10.0
    branch_spread: float = 10.0
    batch_rtol: float = 1e-3
    top_layers: int = 3
    min_samples: int = 16

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not (math.isfinite(value) and value > 0):  # fmt: skip
                raise ValueError(f"DiagnoseThresholds.{f.name} must be a positive finite "
                                 f"number, got {value!r}")  # fmt: skip
        if self.var_low >= self.var_high:
            raise ValueError(f"DiagnoseThresholds.var_low ({self.var_low}) must be below "
                             f"var_high ({self.var_high})")  # fmt: skip


@dataclass
class Finding:
    """One check's outcome: ``status`` is ``"problem"``, ``"ok"`` or ``"info"``."""

    check: str
    status: str
    message: str
    layers: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Diagnosis:
    """All findings of :func:`diagnose`, the SPP they came from, and the thresholds used."""

    label: str
    findings: list[Finding]
    spp: SPPResult
    thresholds: DiagnoseThresholds

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "problem"]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        """0 when no problem was found, 1 otherwise (for CI)."""
        return 0 if self.ok else 1

    def to_text(self) -> str:
        lines = [f"diagnosis of {self.label}:"]
        for f in self.findings:
            lines.append(f"  [{f.status.upper():7s}] {f.check}: {f.message}")
            if f.layers:
                lines.append(f"            layers: {', '.join(f.layers)}")
        verdict = "no problems found" if self.ok else f"{len(self.problems)} problem(s) found"
        lines.append(verdict)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "normfree.diagnosis",
            "label": self.label,
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
            "thresholds": asdict(self.thresholds),
            "spp": self.spp.to_dict(),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write the diagnosis as indented JSON to ``path`` (atomically)."""
        return atomic_write_json(path, self.to_dict())


def _top(items: list[tuple[str, float]], n: int) -> list[str]:
    ranked = sorted((it for it in items if math.isfinite(it[1])), key=lambda it: -it[1])
    return [name for name, _ in ranked[:n]]


def _check_mean_shift(spp: SPPResult, t: DiagnoseThresholds) -> Finding:
    pts = [p for p in spp.points if p.kind != "stem"]
    if len(pts) < 2:
        return Finding("mean shift", "info", "fewer than two points after the stem; not checked")
    ratio = [p.avg_sq_mean / p.avg_var if p.avg_var > 0 else math.inf for p in pts]
    worst = max(range(len(pts)), key=lambda i: ratio[i])
    growth = ratio[worst] / ratio[0] if ratio[0] > 0 else math.inf
    values = {"max_ratio": ratio[worst], "at": pts[worst].name, "first_ratio": ratio[0],
              "growth": growth, "last_ratio": ratio[-1]}  # fmt: skip
    # the layers on the way up to the worst point (the first point itself when it is the worst)
    rises = [(pts[i].name, ratio[i] - ratio[i - 1]) for i in range(1, worst + 1)]
    culprits = _top(rises, t.top_layers) if worst else [pts[0].name]
    dominant = min(ratio[worst], ratio[-1]) >= t.mean_shift_dominant  # still so at the output
    problem = ratio[worst] >= t.mean_shift_ratio and (growth >= t.mean_shift_growth or dominant)
    if problem:
        where = (f"{growth:.3g}× the ratio at {pts[0].name}" if worst else
                 "already at the first point after the stem")  # fmt: skip
        msg = (f"squared channel mean reaches {ratio[worst]:.3g}× the channel variance at "
               f"{pts[worst].name} ({where}; {ratio[-1]:.3g}× at the last point); activations "
               "drift towards channel-wise constants (positive-mean activations passed on by "
               "non-zero-mean weights; Scaled WS removes this)")  # fmt: skip
        return Finding("mean shift", "problem", msg, culprits, values)
    msg = (f"squared channel mean / variance stays ≤ {ratio[worst]:.3g} (first {ratio[0]:.3g}, "
           f"last {ratio[-1]:.3g})")  # fmt: skip
    return Finding("mean shift", "ok", msg, [], values)


def _check_variance(spp: SPPResult, input_var: float, t: DiagnoseThresholds) -> Finding:
    pts = spp.points
    rel = [p.avg_var / input_var for p in pts]
    hi, lo = max(rel), min(rel)
    values = {"input_var": input_var, "max_rel_var": hi, "min_rel_var": lo,
              "at_max": pts[rel.index(hi)].name, "at_min": pts[rel.index(lo)].name}  # fmt: skip
    prev = [input_var] + [p.avg_var for p in pts[:-1]]
    jumps = [(p.name, p.avg_var / q if q > 0 else math.inf) for p, q in zip(pts, prev)]
    drops = [(p.name, q / p.avg_var if p.avg_var > 0 else math.inf) for p, q in zip(pts, prev)]
    if hi > t.var_high:
        msg = (f"variance explodes: {hi:.3g}× the input variance at {values['at_max']} "
               f"(threshold {t.var_high:g}×)")  # fmt: skip
        return Finding("variance", "problem", msg, _top(jumps, t.top_layers), values)
    if lo < t.var_low:
        msg = (f"variance vanishes: {lo:.3g}× the input variance at {values['at_min']} "
               f"(threshold {t.var_low:g}×)")  # fmt: skip
        return Finding("variance", "problem", msg, _top(drops, t.top_layers), values)
    return Finding(
        "variance",
        "ok",
        f"channel variance stays within {lo:.3g}–{hi:.3g}× the input's",
        [],
        values,
    )


def _check_branches(spp: SPPResult, input_var: float, t: DiagnoseThresholds) -> Finding:
    pts = spp.points
    branch = [(i, p) for i, p in enumerate(pts) if p.res_avg_var is not None]
    if not branch:
        return Finding(
            "residual branches",
            "info",
            "no residual branch measured (name the last module of each branch with "
            "branch_points, --branch-points on the command line, for models that are not "
            "normfree models)",
        )
    live = [p.res_avg_var for _, p in branch if p.res_avg_var > 0]
    if not live:
        return Finding(
            "residual branches",
            "info",
            "every residual branch outputs exactly 0 at "
            "initialisation (zero-initialised last layers, e.g. Fixup)",
        )
    median = statistics.median(live)
    swamp, off = [], []
    for i, p in branch:
        v_in = pts[i - 1].avg_var if i > 0 else input_var
        if v_in > 0 and p.res_avg_var > t.branch_to_input * v_in:
            swamp.append((p.name, p.res_avg_var / v_in))
        if p.res_avg_var > 0 and max(p.res_avg_var / median, median / p.res_avg_var) > (
            t.branch_spread
        ):
            off.append((p.name, abs(math.log(p.res_avg_var / median))))
    values = {"median_res_avg_var": median, "min": min(live), "max": max(live),
              "swamping": len(swamp), "off_median": len(off)}  # fmt: skip
    if swamp or off:
        parts = []
        if swamp:
            parts.append(f"{len(swamp)} branch(es) exceed {t.branch_to_input:g}× their block "
                         f"input's variance (max {max(r for _, r in swamp):.3g}×)")  # fmt: skip
        if off:
            parts.append(f"{len(off)} branch(es) lie over {t.branch_spread:g}× away from the "
                         f"median branch variance {median:.3g} (range {min(live):.3g}–"
                         f"{max(live):.3g})")  # fmt: skip
        layers = _top(swamp, t.top_layers) + [n for n in _top(off, t.top_layers)
                                              if n not in dict(swamp)]  # fmt: skip
        return Finding("residual branches", "problem", "; ".join(parts), layers, values)
    return Finding("residual branches", "ok", f"branch variance steady: {min(live):.3g}–"
                   f"{max(live):.3g} (median {median:.3g})", [], values)  # fmt: skip


def _batch_finding(res: BatchDependence, t: DiagnoseThresholds) -> Finding:
    values = {"max_rel_diff": res.max_rel_diff, "causes": len(res.causes)}
    name = f"batch dependence ({res.mode} mode)"
    if res.dependent:
        msg = (f"an example's output changes by {res.max_rel_diff:.3g} (relative) when the rest "
               f"of its batch changes; caused by {len(res.causes)} module(s)")  # fmt: skip
        return Finding(name, "problem", msg, [n for n, _ in res.causes[: t.top_layers]], values)
    msg = (f"outputs independent of the rest of the batch (max relative change "
           f"{res.max_rel_diff:.2g} ≤ {t.batch_rtol:g})")  # fmt: skip
    return Finding(name, "ok", msg, [], values)


def diagnose(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    inputs: torch.Tensor | None = None,
    points: str | Sequence[str] | None = None,
    branch_points: str | Sequence[str] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    skip_gains_to_one: bool = True,
    thresholds: DiagnoseThresholds | None = None,
    device: torch.device | str | None = None,
    check_batch_dependence: bool = True,
    label: str | None = None,
) -> Diagnosis:
    """Diagnose ``model``'s signal propagation and batch dependence at initialisation.

    ``input_shape`` is the shape of one example (normfree models default to their test size);
    ``points``/``branch_points`` as in :func:`normfree.analysis.signal_propagation`. The model is
    left unchanged. ``Diagnosis.exit_code`` is 1 when a problem is found.
    """
    t = thresholds or DiagnoseThresholds()
    x, _ = make_inputs(model, inputs, input_shape, batch_size, seed, device)
    spp = signal_propagation(model, inputs=x, points=points, branch_points=branch_points,
                             skip_gains_to_one=skip_gains_to_one, label=label)  # fmt: skip
    findings = []
    bad = spp.config["non_finite_points"]
    if bad:
        findings.append(
            Finding(
                "non-finite activations",
                "problem",
                f"NaN or inf at {len(bad)} point(s)",
                bad[: t.top_layers],
            )
        )
    input_var = channel_stats(x)[1] if x.dim() >= 2 else 1.0
    few = [p for p in spp.points if p.samples is not None and p.samples < t.min_samples]
    left_out = {p.index for p in few}
    if few:
        least = min(few, key=lambda p: p.samples or 0)
        findings.append(Finding(
            "sample size", "info",
            f"{len(few)} point(s) average fewer than {t.min_samples} values per channel "
            f"({least.samples} at {least.name}): not checked (too few values for a mean or a "
            "variance); measure with a larger batch or image size",
            [p.name for p in few[: t.top_layers]],
        ))  # fmt: skip
    checked = replace(spp, points=[p for p in spp.points if p.index not in left_out])
    if not bad and checked.points:
        findings.append(_check_mean_shift(checked, t))
        findings.append(_check_variance(checked, input_var if input_var > 0 else 1.0, t))
        findings.append(_check_branches(checked, input_var, t))
    if check_batch_dependence and x.shape[0] < 2:
        findings.append(Finding("batch dependence", "info", "batch of 1; not checked"))
    elif check_batch_dependence:
        for res in batch_dependence(model, inputs=x, seed=seed, rtol=t.batch_rtol):
            findings.append(_batch_finding(res, t))
    return Diagnosis(spp.label, findings, spp, t)
