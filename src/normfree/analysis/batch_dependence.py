"""Does an example's output depend on the rest of its batch? (Brock et al. 2021a, §1: batch
normalization breaks the independence of the examples in a batch.)

:func:`batch_dependence` runs two batches that share their first example and differ everywhere
else, and compares that example's outputs. It also finds the modules that *cause* the
dependence: every leaf module, and every module with parameters or buffers of its own (timm's
``BatchNormAct2d`` is a BatchNorm with an activation inside), is re-run on its own input with the
other examples replaced, and is reported when the shared example's output changes (e.g. every
BatchNorm in train mode). Both batches run with the same random numbers, so randomness that
train mode leaves on (timm's functional dropout in classifier heads) is not taken for a
dependence.
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
        causes: modules that couple the examples of a batch (example 0's output changes when
            the other inputs of that module change), with that relative change, in forward
            order: leaves, and modules with parameters or buffers of their own when none of
            their submodules is a cause.
    """

    mode: str
    max_rel_diff: float
    dependent: bool
    rtol: float
    causes: list[tuple[str, float]] = field(default_factory=list)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |a| over the elements that differ; NaN against NaN and equal infinities
    are no change (a NaN-producing model is not thereby batch dependent), a finite value against
    a non-finite one is an infinite change, and the scale is taken over ``a``'s finite values."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.double(), b.double()
    changed = (a != b) & ~(a.isnan() & b.isnan())
    if not bool(changed.any()):
        return 0.0
    diff = float((a[changed] - b[changed]).abs().max())
    finite = a[a.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    if not math.isfinite(diff) or scale == 0:
        return float("inf")
    return diff / scale


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
    tested = [(n, m) for n, m in model.named_modules() if n and _own_computation(m)]
    return [_compare(model, mode, xa, xb, tested, rtol) for mode in modes]


def _own_computation(module: nn.Module) -> bool:
    """A leaf, or a module with parameters or buffers of its own (a norm with an activation
    submodule): the modules re-run by the coupling test."""
    if next(module.children(), None) is None:
        return True
    own = (*module.parameters(recurse=False), *module.buffers(recurse=False))
    return bool(own)


def _reseed(device: torch.device) -> None:
    """The same random numbers for each forward pass (the caller's state is restored by
    :func:`~normfree.analysis.context.analysis_mode`)."""
    torch.random.default_generator.manual_seed(_RNG_SEED)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(_RNG_SEED)


_RNG_SEED = 0


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
    tested: list[tuple[str, nn.Module]],
    rtol: float,
) -> BatchDependence:
    """Run ``xa`` and ``xb`` (with the same random numbers) and compare example 0; then run
    ``xa`` again with a coupling test on every module of ``tested``.

    A module is *coupling* when re-running it (``module.forward``, its submodules' hooks idle)
    on its own input with examples 1.. replaced changes example 0's output by more than
    ``rtol``; a module with submodules is reported only when none of them is.
    """
    causes: list[tuple[str, float]] = []
    stash: dict[str, torch.Tensor | None] = {}
    counts: dict[str, int] = {}
    rerunning = [False]  # hooks stay idle while a module is re-run on the alternative batch

    def make_pre_hook(name: str) -> Any:
        def pre_hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            if rerunning[0]:
                return
            first = args[0] if args else None
            ok = isinstance(first, torch.Tensor) and first.is_floating_point()
            stash[name] = first.detach().clone() if ok and first.shape[0] > 1 else None

        return pre_hook

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            if rerunning[0]:
                return
            k = counts.get(name, 0)
            counts[name] = k + 1
            x = stash.pop(name, None)
            out0 = _row0(output)
            if x is None or out0 is None:
                return
            has_children = next(module.children(), None) is not None
            if has_children and any(c.startswith(f"{name}.") for c, _ in causes):
                return  # a submodule already explains it
            rerunning[0] = True
            try:
                alt = _row0(module.forward(_alternative_batch(x), *args[1:], **kwargs))
            finally:
                rerunning[0] = False
            change = _rel_diff(out0, alt) if alt is not None else 0.0
            if change > rtol:
                causes.append((name if k == 0 else f"{name}#{k}", change))

        return hook

    handles = []
    with torch.no_grad(), analysis_mode(model, mode), plain_forward(model):  # every leaf runs
        _reseed(xa.device)
        ya = _row0(model(xa))
        _reseed(xa.device)
        yb = _row0(model(xb))
        try:
            for name, module in tested:
                handles.append(module.register_forward_pre_hook(make_pre_hook(name),
                                                                with_kwargs=True))  # fmt: skip
                handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
            _reseed(xa.device)
            model(xa)
        finally:
            for h in handles:
                h.remove()
    if ya is None or yb is None:
        raise TypeError(f"{type(model).__name__} did not return a batched tensor")
    rel = _rel_diff(ya, yb)
    return BatchDependence(mode, rel, rel > rtol, rtol, causes)
