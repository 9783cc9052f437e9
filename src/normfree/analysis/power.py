"""Power decomposition of pre-activations (Labatie, Masters, Eaton-Rosen & Luschi 2021, "Proxy
Normalization", arXiv 2106.03743, §3, Fig. 2 "power plots").

For pre-activations ``y`` of shape ``(N, C, *S)`` (instances x, channels c, positions α), with
``μ_c(x)`` the mean of channel c of instance x over positions and ``μ_c = E_x[μ_c(x)]``:

    E[y²] = E_c[μ_c²] + E_c[Var_x μ_c(x)] + E_{c,x}[Var_α y_c(x, α)]

* ``channel_mean`` = E_c[μ_c²]: power of channel-wise constants. Dominates with depth under
  LayerNorm ("channel-wise collapse": pre-activations become constant per channel).
* ``instance`` = E_c[Var_x μ_c(x)]: variability of instance statistics. Identically 0 under
  InstanceNorm (every instance has the same per-channel mean β_c), limiting expressivity.
* ``within`` = E_{c,x}[Var_α y_c(x, α)]: variability within instances.

With biased (population) variances the identity is exact (law of total variance), so the three
terms sum to ``E[y²]`` up to rounding. BatchNorm keeps ``channel_mean`` at β_c² by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from normfree.analysis.context import analysis_mode, make_inputs, model_label
from normfree.analysis.recorder import record_points
from normfree.analysis.result_io import JsonResult, from_fields
from normfree.analysis.spp import resolve_points

__all__ = ["PowerPoint", "PowerResult", "power_decomposition", "power_profile"]


@dataclass
class PowerPoint:
    """The decomposition at one point; ``total`` = E[y²] measured directly."""

    index: int
    name: str
    channel_mean: float
    instance: float
    within: float
    total: float

    @property
    def shares(self) -> tuple[float, float, float]:
        """``(channel_mean, instance, within) / total``."""
        t = self.total if self.total > 0 else float("nan")
        return self.channel_mean / t, self.instance / t, self.within / t

    @property
    def channel_mean_share(self) -> float:
        return self.shares[0]

    @property
    def instance_share(self) -> float:
        return self.shares[1]


def power_decomposition(y: torch.Tensor, channel_dim: int = 1) -> dict[str, float]:
    """``{"channel_mean", "instance", "within", "total"}`` of ``y`` (batch axis 0, channel axis
    ``channel_dim``, every other axis a position; see the module docstring). Computed in
    float64. A ``(N, C)`` input has no positions, so ``within`` is 0."""
    if y.dim() < 2 or y.numel() == 0:
        raise ValueError(f"need non-empty (N, C, ...) activations, got shape {tuple(y.shape)}")
    cd = channel_dim % y.dim()
    if cd == 0:
        raise ValueError("channel_dim must not be the batch axis 0")
    t = y.detach().double().movedim(cd, 1)
    t = t.reshape(t.shape[0], t.shape[1], -1)  # (N, C, P)
    inst_mean = t.mean(dim=2)  # μ_c(x), (N, C)
    chan_mean = inst_mean.mean(dim=0)  # μ_c, (C,)
    return {
        "channel_mean": float(chan_mean.square().mean()),
        "instance": float(inst_mean.var(dim=0, correction=0).mean()),
        "within": float(t.var(dim=2, correction=0).mean()),
        "total": float(t.square().mean()),
    }


@dataclass
class PowerResult(JsonResult):
    """Power decomposition at each point, in forward order."""

    label: str
    points: list[PowerPoint]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def channel_mean_share(self) -> list[float]:
        return [p.channel_mean_share for p in self.points]

    @property
    def instance_share(self) -> list[float]:
        return [p.instance_share for p in self.points]

    def to_dict(self) -> dict[str, Any]:
        return {"format": "normfree.power", "label": self.label, "config": self.config,
                "points": [asdict(p) for p in self.points]}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PowerResult:
        if data.get("format") != "normfree.power":
            raise ValueError("not a normfree power result (missing format 'normfree.power')")
        points = [from_fields(PowerPoint, p) for p in data["points"]]
        return cls(data["label"], points, dict(data.get("config", {})))

    def table(self) -> str:
        lines = [self.label, f"{'#':>4} {'point':32s} {'E[y²]':>10} {'chan-mean':>10} "
                 f"{'instance':>10} {'within':>10}   (shares of E[y²])"]  # fmt: skip
        for p in self.points:
            a, b, c = p.shares
            lines.append(f"{p.index:>4} {p.name[:32]:32s} {p.total:10.4g} {a:10.3f} {b:10.3f} "
                         f"{c:10.3f}")  # fmt: skip
        return "\n".join(lines)


def power_profile(
    model: nn.Module,
    inputs: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    points: str | Sequence[str] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    mode: str = "train",
    device: torch.device | str | None = None,
    channel_dim: int = 1,
    label: str | None = None,
    skip_gains_to_one: bool = False,
) -> PowerResult:
    """The power decomposition at each point of ``model`` (pass the pre-activations, e.g.
    ``points="layers.*.norm"`` for :class:`~normfree.analysis.probes.FeedforwardProbe`).
    Inputs, points, modes, ``skip_gains_to_one`` (SkipInit gains at 1 for the measurement; with
    zero gains every block of an NF-ResNet is the identity) and guarantees as in
    :func:`normfree.analysis.signal_propagation`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    specs = resolve_points(model, points)
    x, kind = make_inputs(model, inputs, input_shape, batch_size, seed, device)

    def reduce(t: torch.Tensor, name: str) -> dict[str, float]:
        return power_decomposition(t, channel_dim)

    with torch.no_grad(), analysis_mode(model, mode, skip_gains_to_one):
        records, _ = record_points(model, lambda: model(x), specs, reduce)
    out = [PowerPoint(i, name, **rec["value"]) for i, (name, rec) in enumerate(records.items())]
    config = {"input": kind, "input_shape": list(x.shape[1:]), "batch_size": int(x.shape[0]),
              "seed": seed, "mode": mode, "skip_gains_to_one": bool(skip_gains_to_one)}  # fmt: skip
    return PowerResult(label or model_label(model), out, config)
