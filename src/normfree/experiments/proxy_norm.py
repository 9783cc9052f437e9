"""``proxy-norm``: Proxy Normalization fixes LayerNorm's and GroupNorm's channel-wise collapse
(Labatie, Masters, Eaton-Rosen & Luschi 2021, arXiv 2106.03743, §3–4, Figs. 2 and 4: with LN the
power of channel-wise constants, E_c[μ_c²], grows with depth until pre-activations are nearly
constant per channel; with LN+PN or GN+PN it stays small, as with BN).

Grid: {feed-forward probe, residual probe} × {LN, GN, LN+PN, GN+PN, BN} × seed, at
initialisation (random affine γ ~ N(1, 0.2²), β ~ N(0, 0.2²), as in the paper's power plots).
The pre-activation of each layer is the input of φ after the affine, ``γ·Norm(x) + β`` (inside
PN-Act for the PN probes); its decomposition is :func:`normfree.analysis.power_decomposition`.
The input is Gaussian noise, or the first held-out images of ``--data`` when given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normfree.experiments.grid import Cell, Experiment, GridOptions, register_experiment
from normfree.experiments.plots import new_figure, save_figure

__all__ = ["EXPERIMENT", "NORMS", "preactivation_shares"]

# name -> (probe norm kind, proxy_norm)
NORMS: dict[str, tuple[str, bool]] = {
    "ln": ("layer", False),
    "gn": ("group", False),
    "lnpn": ("layer", True),
    "gnpn": ("group", True),
    "bn": ("batch", False),
}
LABELS = {"ln": "LN", "gn": "GN", "lnpn": "LN+PN", "gnpn": "GN+PN", "bn": "BN"}
ARCHS = {"ff": "feed-forward probe", "res": "residual probe"}


def _plan(options: GridOptions) -> dict[str, int]:
    if options.quick:
        return {"depth": 30, "width": 16, "batch": 8, "size": 8}
    return {"depth": 50, "width": 32, "batch": 32, "size": 16}


def cells(options: GridOptions) -> list[Cell]:
    plan = _plan(options)
    return [
        Cell(f"{a}-{n}-s{s}", {"arch": a, "norm": n, "depth": plan["depth"], "seed": s})
        for a in ARCHS
        for n in NORMS
        for s in range(options.seeds)
    ]


def preactivation_shares(model: Any, x: Any) -> list[float]:
    """Channel-mean share ``E_c[μ_c²] / E[y²]`` of every pre-activation of ``model`` on ``x``, in
    forward order: the input of each ReLU, or ``γ·y + β`` of each PN-Act (its affine applied)."""
    import torch
    from torch import nn

    from normfree.analysis import power_decomposition
    from normfree.nn import ProxyNormActivation, plain_forward

    found: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        y = args[0]
        if isinstance(module, ProxyNormActivation):
            shape = (1, -1) + (1,) * (y.dim() - 2)
            y = y * module.weight.view(shape) + module.bias.view(shape)
        found.append(y.detach())

    inner = {
        id(a)
        for m in model.modules()
        if isinstance(m, ProxyNormActivation)
        for a in m.modules()
        if a is not m
    }  # PN-Act's own φ is not a pre-activation point
    handles = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.ReLU, ProxyNormActivation)) and id(m) not in inner
    ]
    try:
        with torch.no_grad(), plain_forward(model):  # every PN-Act called: its hook runs
            model.train()  # BN with batch statistics, as during training
            model(x)
    finally:
        for h in handles:
            h.remove()
    shares = []
    for y in found:
        d = power_decomposition(y)
        shares.append(d["channel_mean"] / d["total"] if d["total"] > 0 else float("nan"))
    return shares


def _inputs(options: GridOptions, plan: dict[str, int], seed: int) -> Any:
    import torch

    if options.data is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(plan["batch"], 3, plan["size"], plan["size"], generator=g)
    from normfree.data import build_datasets

    val = build_datasets(options.data, seed=seed).val
    return torch.stack([val[i][0] for i in range(min(plan["batch"], len(val)))])


def run_cell(cell: Cell, folder: Path, options: GridOptions) -> dict[str, Any]:
    import torch

    from normfree.analysis import FeedforwardProbe, ResNetProbe

    p, plan = cell.params, _plan(options)
    kind, pn = NORMS[p["norm"]]
    x = _inputs(options, plan, p["seed"])
    torch.manual_seed(p["seed"])
    common = {"width": plan["width"], "in_chans": int(x.shape[1]), "norm": kind,
              "affine_std": 0.2, "proxy_norm": pn}  # fmt: skip
    if p["arch"] == "ff":
        model = FeedforwardProbe(depth=p["depth"], **common)
    else:
        model = ResNetProbe(units=p["depth"], **common)
    shares = preactivation_shares(model, x)
    third = max(1, len(shares) // 3)
    return {
        "first_share": shares[0],
        "deep_share": sum(shares[-third:]) / third,  # mean over the deepest third
        "max_share": max(shares),
        "points": len(shares),
        "curve": shares,
    }


def plot(rows: list[dict[str, Any]], path: Path, options: GridOptions) -> None:
    fig, axes = new_figure(2)
    for ax, arch in zip(axes, ARCHS):
        for norm in NORMS:
            curves = [r["curve"] for r in rows if r["arch"] == arch and r["norm"] == norm]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=LABELS[norm], ls="--" if "pn" in norm else "-")
        ax.set_yscale("log")
        ax.set_xlabel("pre-activation (forward order)")
        ax.set_ylabel("channel-mean share E_c[μ_c²]/E[y²]")
        ax.set_title(f"{ARCHS[arch]}, at init ({options.data or 'Gaussian input'})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


EXPERIMENT = register_experiment(
    Experiment(
        name="proxy-norm",
        claim="Proxy Normalization removes the channel-wise collapse of LN/GN networks",
        cells=cells,
        run_cell=run_cell,
        columns=["first_share", "deep_share", "max_share", "points"],
        plot=plot,
        default_data=None,
    )
)
