"""Per-unit norms that adaptive gradient clipping (Brock et al. 2021b, eq. 3) would otherwise
read the weights and gradients again for, kept by the kernels that already had them.

A forward that computes each output unit's mean and variance of a parameter (the eager CPU
Scaled-WS forward of :mod:`normfree.nn.ws_functional`, as ``rsqrt(var)``; the native one as
``N·var``; the accelerator one as ``var``) keeps them here, so ``‖W_o‖² = N·var_o + N·μ_o²``
costs AGC nothing; a native backward keeps the per-unit norms of the gradient it wrote. Both
are keyed by the parameter's identity and checked before use (the weight's version, memory,
dtype, device and the number of optimizer steps since,
:func:`normfree.nn.param_updates.tensor_key`, because fused optimizer kernels update weights
without bumping their version; the gradient's memory, version, forward and a spot check), so
a stale value is not read:
:func:`unit_norms_from_forward` and :func:`unit_grad_norms_from_backward` return ``None``
instead and AGC computes the norm itself.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

from normfree.nn.param_updates import holds_memory_of, memory_ref, optimizer_steps, tensor_key

__all__ = [
    "forget_unit_norms",
    "remember_grad_norms",
    "remember_unit_stats",
    "unit_grad_norms_from_backward",
    "unit_norm_from_forward",
    "unit_norms_from_forward",
    "wants_grad_norms",
]

# Keyed by the parameter's identity (tensors compare elementwise, so no WeakKeyDictionary) and
# dropped with its memory (a weak reference to its storage, never to the tensor:
# normfree.nn.param_updates.memory_ref):
# id(weight) → (weak ref to its storage, its tensor_key, per-unit mean, per-unit N·var,
# rsqrt(var) or var, forward number, which of the three: _N_VAR, _INV_STD, _VAR) from its last
# forward that kept them, and
# id(weight) → (weak ref to its storage, its gradient's data_ptr, that gradient's version,
# per-unit ‖∂L/∂W_o‖, number of the forward it differentiates, optimizer steps so far) from its
# last native backward.
_UNIT_STATS: dict[int, tuple] = {}
_GRAD_NORMS: dict[int, tuple] = {}
_FORWARDS = itertools.count()
_N_VAR, _INV_STD, _VAR = 0, 1, 2  # how a kept variance is stored (the order of the arguments)
_HALF = (torch.float16, torch.bfloat16)


def _remember(store: dict[int, tuple], weight: Tensor, *facts: object) -> None:
    key = id(weight)
    entry = store.get(key)
    ref = entry[0] if entry is not None and holds_memory_of(entry[0], weight) else None
    if ref is None:
        ref = memory_ref(weight, lambda _, key=key: store.pop(key, None))
    if ref is None:  # no storage to tie the facts to: keep none
        store.pop(key, None)
        return
    store[key] = (ref, *facts)


def remember_unit_stats(
    weight: Tensor,
    mean: Tensor,
    n_var: Tensor | None = None,
    *,
    inv_std: Tensor | None = None,
    var: Tensor | None = None,
) -> int:
    """Keep a parameter's per-unit mean and variance from a forward that computed them (the
    eager Scaled-WS forwards), the variance as ``n_var = N·var``, as ``inv_std = rsqrt(var)``
    or as the biased ``var`` itself (exactly one of them); returns the number of this forward,
    which the gradient norms of its backward carry."""
    given = [k for k, v in enumerate((n_var, inv_std, var)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of n_var, inv_std and var")
    number = next(_FORWARDS)
    if weight.is_inference():  # no version to check a later read against: keep nothing
        return number
    kind = given[0]
    variance = (n_var, inv_std, var)[kind].detach()
    mean = mean.detach()
    if variance.dtype in _HALF:  # rsqrt(var)² of a half weight overflows (var < 2⁻¹⁶ → inf)
        mean, variance = mean.float(), variance.float()
    _remember(_UNIT_STATS, weight, tensor_key(weight), mean, variance, number, kind)
    return number


def forget_unit_norms(weights: list[Tensor]) -> None:
    """Drop whatever is kept for ``weights`` (after writes the checks cannot see:
    :func:`normfree.nn.clear_caches`)."""
    for w in weights:
        _UNIT_STATS.pop(id(w), None)
        _GRAD_NORMS.pop(id(w), None)


def unit_norm_from_forward(weight: Tensor) -> Tensor | None:
    """The per-output-unit Frobenius norm ``‖W_o‖`` (shape ``(out,)``) of ``weight`` from the
    statistics its last eager Scaled-WS forward already computed
    (``‖W_o‖² = N·var_o + N·μ_o²``), or ``None`` when there are none or ``weight`` may have
    changed since (its version, memory, dtype or device moved, or an optimizer stepped: module
    docstring). Adaptive gradient clipping reads it
    (:mod:`normfree.optim.agc`) instead of a second pass over the weights."""
    return unit_norms_from_forward([weight])[0]


def unit_norms_from_forward(weights: list[Tensor]) -> list[Tensor | None]:
    """:func:`unit_norm_from_forward` of many weights in one batch of kernels (a handful of
    small ops in all, per kind of variance kept, instead of six per weight: a model's AGC step
    asks for every conv)."""
    found: list[Tensor | None] = [None] * len(weights)
    by_kind: tuple[list, ...] = ([], [], [])  # (index, weight, stats): N·var, rsqrt(var), var
    for k, w in enumerate(weights):
        stats = _UNIT_STATS.get(id(w))
        # (no statistics are kept for inference tensors, so w here has a version)
        if stats is not None and stats[1] == tensor_key(w) and holds_memory_of(stats[0], w):
            by_kind[stats[5]].append((k, w, stats))
    for kind, hits in enumerate(by_kind):
        if not hits:
            continue
        mean = torch.cat([s[2] for _, _, s in hits])
        counts = tuple(w.shape[0] for _, w, _ in hits)
        fan_in = _per_unit(counts, tuple(w[0].numel() for _, w, _ in hits), mean.dtype, mean.device)
        variance = torch.cat([s[3] for _, _, s in hits])
        if kind == _INV_STD:  # N·(μ² + 1/rsqrt(var)²)
            norms = variance.square().reciprocal_().addcmul_(mean, mean).mul_(fan_in)
        elif kind == _VAR:  # N·(var + μ²)
            norms = torch.addcmul(variance, mean, mean).mul_(fan_in)
        else:  # N·var + N·μ²
            norms = torch.addcmul(variance, mean.square(), fan_in)
        norms = norms.sqrt_()
        for (k, _, _), norm in zip(hits, norms.split(counts)):
            found[k] = norm
    return found


def remember_grad_norms(
    weight: Tensor, grad: Tensor, norms: Tensor | None, forward_number: int | None
) -> None:
    """Keep the per-unit norms of ``grad``, the gradient a native backward just computed for
    the parameter ``weight`` from its forward number ``forward_number``; ``norms`` is None
    where the backward computed none because :func:`wants_grad_norms` said no, and then
    whatever was kept for ``weight`` is dropped."""
    if forward_number is None:
        return
    if norms is not None:
        _remember(
            _GRAD_NORMS, weight, grad.data_ptr(), grad._version, norms, forward_number,
            optimizer_steps(),
        )  # fmt: skip
    else:
        _GRAD_NORMS.pop(id(weight), None)


def wants_grad_norms(weight: Tensor, forward_number: int | None) -> bool:
    """Whether a backward should compute the gradient norms of ``weight`` for
    :func:`remember_grad_norms` (a parameter whose gradient autograd will store as is)."""
    return forward_number is not None and weight.grad is None and weight.is_contiguous()


def unit_grad_norms_from_backward(
    weights: list[Tensor], grads: list[Tensor]
) -> list[Tensor | None]:
    """The per-output-unit norms ``‖G_o‖`` (shape ``(out,)``) of each weight's gradient ``G``
    as the native Scaled-WS backward (:mod:`normfree.nn.native`) summed them while writing
    ``G``, or ``None`` for a weight without them. Adaptive
    gradient clipping reads them (:mod:`normfree.optim.agc`) instead of a pass over the
    gradients.

    They are returned only for the very gradient that backward wrote: it must differentiate
    the weight's latest eager forward, ``grads[k]`` must be the tensor autograd stored as
    ``.grad`` (same memory, no in-place change since: its version), the backward must have
    run with no ``.grad`` already present (gradient accumulation sums into the old tensor),
    and a spot check recomputes the first and last unit of every such gradient: if any
    differs (an in-place change the version counter misses that rewrites whole gradients, e.g.
    ``GradScaler.unscale_`` or a write through ``.data``), none is returned. A write through
    ``.data`` to some middle units only (e.g. pruning rows of ``p.grad.data``) is not caught:
    after such writes, call AGC without the native kernels or write through ``p.grad`` (which
    bumps the version)."""
    found: list[Tensor | None] = []
    for w, g in zip(weights, grads):
        entry = _GRAD_NORMS.get(id(w))
        stats = _UNIT_STATS.get(id(w))
        fresh = (
            entry is not None
            and entry[1] == g.data_ptr()
            and holds_memory_of(entry[0], w)
            and entry[2] == g._version
            and stats is not None
            and stats[4] == entry[4]  # no other forward of this weight since
            and entry[5] == optimizer_steps()  # no optimizer step since (a new .grad)
            and g.shape == w.shape
            and g.is_contiguous()
        )
        found.append(entry[3] if fresh else None)
    hits = [n for n in found if n is not None]
    if not hits:
        return found
    rows = [g[k] for g, n in zip(grads, found) if n is not None for k in (0, -1)]
    direct = torch.stack(torch._foreach_norm(rows, 2))
    ends = list(itertools.accumulate(n.shape[0] for n in hits))
    index = torch.tensor([i for e, n in zip(ends, hits) for i in (e - n.shape[0], e - 1)])
    stored = torch.cat(hits).index_select(0, index)
    rtol = 1e-10 if stored.dtype == torch.float64 else 1e-5
    if not torch.allclose(direct, stored, rtol=rtol, atol=0.0):
        return [None] * len(weights)
    return found


@functools.lru_cache(maxsize=32)
def _per_unit(
    counts: tuple[int, ...], values: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``values[k]`` repeated ``counts[k]`` times, as one tensor (cached: a model asks for the
    same layout every step)."""
    out = torch.tensor(values, dtype=dtype, device=device)
    repeats = torch.tensor(counts, dtype=torch.long, device=device)
    return out.repeat_interleave(repeats, output_size=sum(counts))  # the size: no device read
