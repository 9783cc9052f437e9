"""Does an example's output depend on the rest of its batch? (Brock et al. 2021a, §1: batch
normalization breaks the independence of the examples in a batch.)

:func:`batch_dependence` runs two batches that share their first example and differ everywhere
else, and compares that example's outputs. It also finds the modules that *cause* the
dependence: every leaf module is re-run on its own input with the other examples replaced, and
is reported when the shared example's output changes (e.g. every BatchNorm in train mode).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normfree.analysis.context import analysis_mode, make_inputs
from normfree.nn.residual import plain_forward

__all__ = ["BatchDependence", "batch_dependence"]


@dataclass
class BatchDependence:
    """Result of :func:`batch_dependence` in one mode.

    Attributes:
        mode: ``"train"`` or ``"eval"``.
        max_rel_diff: max |out_A − out_B| of the shared example / max |out_A|.
        dependent: ``max_rel_diff > rtol``.
        causes: leaf modules that couple the examples of a batch (example 0's output changes
            when the other inputs of that module change), with that relative change, in forward
            order.
    """

    mode: str
    max_rel_diff: float
    dependent: bool
    rtol: float
    causes: list[tuple[str, float]] = field(default_factory=list)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    scale = float(a.abs().max()) if a.numel() else 0.0
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _row0(value: Any) -> torch.Tensor | None:
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] > 1:
        return value.detach()[0].clone()
    return None


def batch_dependence(
    model: nn.Module,
    inputs: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    modes: Sequence[str] = ("train", "eval"),
    rtol: float = 1e-3,
    device: torch.device | str | None = None,
) -> list[BatchDependence]:
    """Check whether example 0's output changes when the other examples of its batch change.

    Batch A is ``inputs`` (or seeded Gaussian noise); batch B keeps A's first example and draws
    the others anew (seed ``seed + 1``). Dropout and stochastic depth are off, buffers are
    restored (see :func:`normfree.analysis.context.analysis_mode`).
    """
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < math.inf:
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol!r}")
    if batch_size < 2 and inputs is None:
        raise ValueError(
            f"batch_size must be at least 2 to test batch dependence, not {batch_size}"
        )
    xa, _ = make_inputs(model, inputs, input_shape, batch_size, seed, device)
    if xa.shape[0] < 2:
        raise ValueError("need a batch of at least 2 examples to test batch dependence")
    others, _ = make_inputs(model, None, tuple(xa.shape[1:]), xa.shape[0], seed + 1, xa.device)
    xb = torch.cat([xa[:1], others[1:].to(xa.dtype)])
    leaves = [(n, m) for n, m in model.named_modules() if n and not m._modules]
    return [_compare(model, mode, xa, xb, leaves, rtol) for mode in modes]


def _alternative_batch(x: torch.Tensor) -> torch.Tensor:
    """``x`` with example 0 kept and the others changed in mean, scale and content."""
    gen = torch.Generator().manual_seed(12345)
    noise = torch.randn(x[1:].shape, generator=gen).to(device=x.device, dtype=x.dtype)
    return torch.cat([x[:1], 1.0 - 2.0 * x[1:] + noise])


def _compare(
    model: nn.Module,
    mode: str,
    xa: torch.Tensor,
    xb: torch.Tensor,
    leaves: list[tuple[str, nn.Module]],
    rtol: float,
) -> BatchDependence:
    """Run ``xa`` with a coupling test on every leaf module, then ``xb``; compare example 0.

    A leaf is *coupling* when re-running it (``module.forward``, no hooks) on its own input with
    examples 1.. replaced changes example 0's output by more than ``rtol``.
    """
    causes: list[tuple[str, float]] = []
    stash: dict[str, torch.Tensor | None] = {}
    counts: dict[str, int] = {}

    def make_pre_hook(name: str) -> Any:
        def pre_hook(module: nn.Module, args: Any) -> None:
            first = args[0] if args else None
            ok = isinstance(first, torch.Tensor) and first.is_floating_point()
            stash[name] = first.detach().clone() if ok and first.shape[0] > 1 else None

        return pre_hook

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            k = counts.get(name, 0)
            counts[name] = k + 1
            x = stash.pop(name, None)
            out0 = _row0(output)
            if x is None or out0 is None:
                return
            alt = _row0(module.forward(_alternative_batch(x), *args[1:]))
            change = _rel_diff(out0, alt) if alt is not None else 0.0
            if change > rtol:
                causes.append((name if k == 0 else f"{name}#{k}", change))

        return hook

    handles = []
    with torch.no_grad(), analysis_mode(model, mode), plain_forward(model):  # every leaf runs
        try:
            for name, module in leaves:
                handles.append(module.register_forward_pre_hook(make_pre_hook(name)))
                handles.append(module.register_forward_hook(make_hook(name)))
            ya = _row0(model(xa))
        finally:
            for h in handles:
                h.remove()
        yb = _row0(model(xb))
    if ya is None or yb is None:
        raise TypeError(f"{type(model).__name__} did not return a batched tensor")
    rel = _rel_diff(ya, yb)
    return BatchDependence(mode, rel, rel > rtol, rtol, causes)
