"""Moments and normalized sensitivity of a network's signal (Labatie 2019, "Characterizing
well-behaved vs. pathological deep neural networks", ICML, arXiv 1811.03087).

A signal ``x`` and an infinitesimal perturbation ``dx`` are pushed through the *same* network:
``dx`` is propagated with forward-mode automatic differentiation
(:mod:`torch.autograd.forward_ad` dual tensors, i.e. the exact Jacobian-vector product; no finite
differences). At each point, averaging over batch, positions and channels:

* ``nu1_abs`` = ν₁(|x|) = E|x|, ``nu2`` = ν₂(x) = E[x²] (non-central);
* ``mu2`` = μ₂(x) and ``mu4`` = μ₄(x): central moments with the mean of each channel over
  (N, H, W) removed, averaged over channels;
* ``kurtosis`` = mean over channels of μ₄,c/μ₂,c² and ``nu1_abs_z`` = E|z| of the per-channel
  standardised ``z`` (3 and √(2/π) ≈ 0.798 for a Gaussian; Labatie's μ₄(z), ν₁(|z|));
* ``eff_rank`` = Σλ/max λ of the channel covariance (λ = s², s the singular values of the
  centred (N·H·W × C) matrix; computed from the eigenvalues of its C×C Gram matrix, which are
  the same λ), and ``eff_rank_dx`` for the perturbation;
* ``mu2_dx`` = E[dx²] (``dx`` has zero mean by symmetry of the input perturbation);
* ``chi`` = χ = sqrt(μ₂(dx)/μ₂(x)) (Labatie eq. 5, normalized sensitivity), ``delta_chi`` =
  χ_l/χ_{l-1} (the increment of the layer(s) between two points; the first point is compared
  with the input).

In train mode the tangent of a BatchNorm also carries the derivative of the batch statistics with
respect to the perturbation; for random ``dx`` this term is O(1/(N·H·W)) and negligible. Labatie
propagates ``dx`` through BN with the signal's statistics held fixed.

:func:`fit_growth` decides whether χ grows exponentially (``log χ`` linear in depth ``l``:
pathological feedforward nets) or as a power law (``log χ`` linear in ``log l``: residual nets).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from normfree.analysis.context import analysis_mode, make_inputs, model_label
from normfree.analysis.recorder import record_points
from normfree.analysis.result_io import JsonResult, from_fields
from normfree.analysis.spp import resolve_points

__all__ = [
    "GrowthFit",
    "MomentsPoint",
    "MomentsResult",
    "effective_rank",
    "fit_growth",
    "moment_stats",
    "propagate_moments",
]


def _channels_first(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(f"need at least (N, C) activations, got shape {tuple(x.shape)}")
    return x.detach().movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1).double()


def effective_rank(x: torch.Tensor, channel_dim: int = 1) -> float:
    """``Σλ / max λ`` of the channel covariance of ``x`` (Labatie 2019, §3): λ are the squared
    singular values of the per-channel-centred (samples × C) matrix. 0 for a constant signal."""
    c = _channels_first(x, channel_dim)
    c = c - c.mean(dim=1, keepdim=True)
    lam = torch.linalg.eigvalsh(c @ c.T).clamp_min(0.0)
    top = float(lam.max())
    return float(lam.sum()) / top if top > 0 else 0.0


def moment_stats(x: torch.Tensor, channel_dim: int = 1) -> dict[str, float]:
    """``nu1_abs, nu2, mu2, mu4, kurtosis, nu1_abs_z`` of ``x`` (see the module docstring)."""
    c = _channels_first(x, channel_dim)
    centred = c - c.mean(dim=1, keepdim=True)
    mu2_c = centred.square().mean(dim=1)
    mu4_c = centred.pow(4).mean(dim=1)
    live = mu2_c > 0
    if bool(live.any()):
        kurt = float((mu4_c[live] / mu2_c[live].square()).mean())
        nu1_z = float((centred[live].abs().mean(dim=1) / mu2_c[live].sqrt()).mean())
    else:
        kurt = nu1_z = math.nan
    return {
        "nu1_abs": float(c.abs().mean()),
        "nu2": float(c.square().mean()),
        "mu2": float(mu2_c.mean()),
        "mu4": float(mu4_c.mean()),
        "kurtosis": kurt,
        "nu1_abs_z": nu1_z,
    }


@dataclass
class MomentsPoint:
    """Moments and sensitivity at one point; ``depth`` is 0 for the stem, then 1, 2, ..."""

    index: int
    name: str
    kind: str
    depth: int
    nu1_abs: float
    nu2: float
    mu2: float
    mu4: float
    kurtosis: float
    nu1_abs_z: float
    eff_rank: float
    mu2_dx: float
    eff_rank_dx: float
    chi: float
    delta_chi: float


@dataclass
class GrowthFit:
    """Least-squares fits of ``log χ`` against depth ``l`` (exponential: ``χ ∝ e^{rate·l}``) and
    against ``log l`` (power law: ``χ ∝ l^exponent``), with their R².

    ``verdict`` is ``"exponential"`` or ``"power law"`` (the better R²), or ``"no growth"`` when
    χ changes by less than ``min_growth``× (up or down) between the first and last fitted points;
    a χ that shrinks more than that gets the verdict of its fit, with ``rate``/``exponent`` < 0.
    """

    rate: float
    exp_r2: float
    exponent: float
    pow_r2: float
    growth: float
    verdict: str

    @property
    def factor_per_layer(self) -> float:
        """``e^{rate}``: the geometric growth of χ per point of the exponential fit."""
        return math.exp(self.rate)


def _linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Slope, intercept and R² of the least-squares line ``y ≈ a·x + b``."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    syy = sum((b - my) ** 2 for b in y)
    slope = sxy / sxx if sxx > 0 else 0.0
    intercept = my - slope * mx
    r2 = 1.0 - sum((b - (slope * a + intercept)) ** 2 for a, b in zip(x, y)) / syy if syy else 1.0
    return slope, intercept, r2


def fit_growth(
    chi: Sequence[float], depths: Sequence[float] | None = None, min_growth: float = 1.25
) -> GrowthFit:
    """Decide whether ``chi`` grows exponentially or as a power law in ``depths``
    (default ``1..L``; every depth must be > 0). Labatie 2019: BN feedforward nets grow
    exponentially (pathological), BN-ResNets as a power law (well behaved)."""
    chi = [float(c) for c in chi]
    depths = [float(d) for d in depths] if depths is not None else list(range(1, len(chi) + 1))
    if len(chi) != len(depths):
        raise ValueError(f"chi and depths differ in length: {len(chi)} vs {len(depths)}")
    if len(chi) < 3:
        raise ValueError(f"need at least 3 points to fit a growth law, got {len(chi)}")
    if any(not (c > 0 and math.isfinite(c)) for c in chi):
        raise ValueError("chi must be positive and finite to fit a growth law")
    if any(d <= 0 for d in depths):
        raise ValueError("depths must be > 0 (log l is taken)")
    log_chi = [math.log(c) for c in chi]
    rate, _, exp_r2 = _linear_fit(depths, log_chi)
    exponent, _, pow_r2 = _linear_fit([math.log(d) for d in depths], log_chi)
    growth = chi[-1] / chi[0]
    if max(growth, 1.0 / growth) < min_growth:
        verdict = "no growth"
    else:
        verdict = "exponential" if exp_r2 > pow_r2 else "power law"
    return GrowthFit(rate, exp_r2, exponent, pow_r2, growth, verdict)


@dataclass
class MomentsResult(JsonResult):
    """Per-point moments and sensitivity, the input's χ, and the growth fit over depth ≥ 1."""

    label: str
    points: list[MomentsPoint]
    input_chi: float
    fit: GrowthFit | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def chi(self) -> list[float]:
        return [p.chi for p in self.points]

    @property
    def depths(self) -> list[int]:
        return [p.depth for p in self.points]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "normfree.moments",
            "label": self.label,
            "input_chi": self.input_chi,
            "fit": asdict(self.fit) if self.fit is not None else None,
            "config": self.config,
            "points": [asdict(p) for p in self.points],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MomentsResult:
        if data.get("format") != "normfree.moments":
            raise ValueError("not a normfree moments result (missing format 'normfree.moments')")
        fit = from_fields(GrowthFit, data["fit"]) if data.get("fit") else None
        points = [from_fields(MomentsPoint, p) for p in data["points"]]
        chi = math.nan if data["input_chi"] is None else data["input_chi"]
        return cls(data["label"], points, chi, fit, dict(data.get("config", {})))

    def table(self) -> str:
        head = (f"{'#':>4} {'point':32s} {'l':>4} {'mu2':>10} {'kurt':>7} {'nu1|z|':>7} "
                f"{'r_eff':>7} {'chi':>10} {'dchi':>7}")  # fmt: skip
        lines = [self.label, head]
        for p in self.points:
            lines.append(
                f"{p.index:>4} {p.name[:32]:32s} {p.depth:>4} {p.mu2:10.4g} {p.kurtosis:7.3f} "
                f"{p.nu1_abs_z:7.3f} {p.eff_rank:7.2f} {p.chi:10.4g} {p.delta_chi:7.3f}"
            )
        if self.fit is not None:
            f = self.fit
            lines.append(
                f"chi: {f.verdict} (exponential R²={f.exp_r2:.4f}, ×{f.factor_per_layer:.3f}/l; "
                f"power law R²={f.pow_r2:.4f}, l^{f.exponent:.3f}; growth ×{f.growth:.3g})"
            )
        return "\n".join(lines)


def propagate_moments(
    model: nn.Module,
    inputs: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    points: str | Sequence[str] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    mode: str = "train",
    skip_gains_to_one: bool = False,
    device: torch.device | str | None = None,
    channel_dim: int = 1,
    label: str | None = None,
) -> MomentsResult:
    """Propagate a signal and an infinitesimal perturbation ``dx ~ N(0, 1)`` (seeded with
    ``seed + 1``) through ``model`` and report Labatie's moments and χ at each point.

    Points, inputs, ``mode`` and the guarantees (no hooks left, modes, buffers and gains
    restored) are those of :func:`normfree.analysis.signal_propagation`; a model may list its
    points in an ``analysis_points`` attribute (the probe networks do). Every operation in the
    model needs a forward-mode AD formula (all of PyTorch's standard layers have one).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    specs = resolve_points(model, points)
    x, kind = make_inputs(model, inputs, input_shape, batch_size, seed, device)
    input_mu2 = moment_stats(x, channel_dim)["mu2"]
    if not input_mu2 > 0:  # χ = sqrt(μ₂(dx)/μ₂(x)) of the input is undefined
        raise ValueError(
            f"the input batch of shape {tuple(x.shape)} has no variance within any channel "
            "(a batch of 1 without positions, or a constant batch), so χ is undefined; use a "
            "larger batch or inputs that vary"
        )
    gen = torch.Generator().manual_seed(int(seed) + 1)
    dx = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)

    def reduce(t: torch.Tensor, name: str) -> dict[str, float]:
        primal, tangent = fwAD.unpack_dual(t)
        stats = moment_stats(primal, channel_dim)
        stats["eff_rank"] = effective_rank(primal, channel_dim)
        if tangent is None:
            stats["mu2_dx"], stats["eff_rank_dx"] = 0.0, 0.0
        else:
            stats["mu2_dx"] = float(_channels_first(tangent, channel_dim).square().mean())
            stats["eff_rank_dx"] = effective_rank(tangent, channel_dim)
        return stats

    def run() -> None:
        with fwAD.dual_level(), warnings.catch_warnings():
            # PyTorch scripts its own forward-AD decompositions on first use, and recent
            # releases warn that torch.jit.script is deprecated: nothing the user can act on
            warnings.filterwarnings(
                "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
            )
            model(fwAD.make_dual(x, dx))

    try:
        with torch.no_grad(), analysis_mode(model, mode, skip_gains_to_one):
            records, _ = record_points(model, run, specs, reduce)
    except RuntimeError as err:
        # PyTorch says "forward AD" or "forward-mode"; a custom Function without a jvp says
        # "forward mode AD" (a NotImplementedError, which is a RuntimeError)
        text = str(err).lower()
        if "forward ad" in text or "forward-mode" in text or "forward mode" in text:
            raise RuntimeError(
                f"{type(model).__name__} uses an operation without a forward-mode AD formula, "
                f"so the sensitivity cannot be propagated: {err}"
            ) from err
        raise
    input_chi = math.sqrt(float(dx.double().square().mean()) / input_mu2)
    kinds = {s.name: s.kind for s in specs}
    out, prev, depth = [], input_chi, 0
    for i, (name, rec) in enumerate(records.items()):
        v = rec["value"]
        chi = math.sqrt(v["mu2_dx"] / v["mu2"]) if v["mu2"] > 0 else math.inf
        depth = 0 if kinds[name] == "stem" and i == 0 else depth + 1
        delta = chi / prev if prev > 0 else math.inf
        out.append(MomentsPoint(i, name, kinds[name], depth, **v, chi=chi, delta_chi=delta))
        prev = chi
    fitted = [p for p in out if p.depth > 0 and p.chi > 0 and math.isfinite(p.chi)]
    fit = None
    if len(fitted) >= 3:
        fit = fit_growth([p.chi for p in fitted], [p.depth for p in fitted])
    config = {"input": kind, "input_shape": list(x.shape[1:]), "batch_size": int(x.shape[0]),
              "seed": seed, "mode": mode, "skip_gains_to_one": bool(skip_gains_to_one)}  # fmt: skip
    return MomentsResult(label or model_label(model), out, input_chi, fit, config)
