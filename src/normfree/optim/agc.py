"""Adaptive gradient clipping (AGC, Brock et al. 2021b, §4.1, Eq. 3).

For every unit ``i`` of a parameter ``W`` with gradient ``G``::

    max_norm_i = λ · max(‖W_i‖_F, ε)
    G_i ← G_i · max_norm_i / max(‖G_i‖_F, 1e-6)      where ‖G_i‖_F > max_norm_i

Units in PyTorch layouts (:func:`unitwise_norm`): a tensor with ``ndim ≥ 2`` has one unit per
output row (the norm runs over every dim but 0: conv ``(O, I, kh, kw)``, linear ``(O, I)``);
a tensor with ``ndim ≤ 1`` (gains, biases, scalars) is a single unit, as in the official code
(``nfnets/agc_optax.py``). ε = 1e-3 keeps zero-initialised parameters from being clipped to zero.

:func:`adaptive_clip_grad_` is the functional form; :func:`attach_agc` (or :class:`AGC`) attaches
the clipping to any optimizer through its public step pre-hook, excludes parameters by name,
pattern or predicate (by default a normfree model's final linear layer,
:func:`unclipped_classifier`) and supports per-group clipping values.
Norms are computed in float32 (float64 for float64 tensors), so bf16/fp16 gradients are handled.
With ``GradScaler``, the functional form is called after ``scaler.unscale_``; the attached form
is right either way: ``scaler.step(optimizer)`` unscales before the step of an ordinary
optimizer, and hands a fused one (``fused=True``, which unscales inside its kernel) the scale as
``optimizer.grad_scale``, which AGC then applies to the threshold (both sides of Eq. 3 scale
alike, so the clipped gradient is the same).
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from normfree.nn.unit_norms import unit_grad_norms_from_backward, unit_norms_from_forward
from normfree.optim.hooks import before_step_hook, record_attached

__all__ = ["AGC", "adaptive_clip_grad_", "attach_agc", "unclipped_classifier", "unitwise_norm"]

_MIN_GRAD_NORM = 1e-6  # denominator floor of the official code

ExcludeSpec = Iterable[str] | str | Callable[[str, torch.Tensor], bool] | None


def _norm_dtype(*tensors: torch.Tensor) -> torch.dtype:
    for t in tensors:  # (a loop: AGC asks this for every parameter at every step)
        if t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm per unit: over every dim but 0 (keepdim) for ``ndim ≥ 2``, over the whole
    tensor (a 0-d result) for ``ndim ≤ 1``. Computed in float32 (float64 for float64 input)."""
    dtype = _norm_dtype(x)
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, 2, dtype=dtype)
    return torch.linalg.vector_norm(x, 2, dim=tuple(range(1, x.ndim)), keepdim=True, dtype=dtype)


def _check_clipping(clipping: Any, eps: Any) -> tuple[float, float]:
    if isinstance(clipping, bool) or not isinstance(clipping, (int, float)):
        raise TypeError(f"clipping must be a float, got {type(clipping).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(clipping) and clipping > 0.0):
        raise ValueError(f"clipping must be a positive finite number, got {clipping}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be a non-negative finite number, got {eps}")
    return float(clipping), float(eps)


class _Layout:
    """Where every unit of a list of parameters sits in the flat vector of unit norms, and the
    index tensors AGC needs for it; built once per (shapes, device) and cached, so a step pays
    no per-tensor bookkeeping kernels."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], device: torch.device) -> None:
        self.big = [i for i, shape in enumerate(shapes) if len(shape) >= 2]
        self.small = [i for i, shape in enumerate(shapes) if len(shape) <= 1]
        self.order = self.big + self.small
        sizes = [shapes[i][0] for i in self.big] + [1] * len(self.small)
        self.starts = [0, *itertools.accumulate(sizes)]
        self.reduce_dims = [tuple(range(1, len(shapes[i]))) for i in self.big]
        self.ends = torch.tensor(self.starts[1:], device=device) - 1


@functools.lru_cache(maxsize=32)
def _layout(shapes: tuple[torch.Size, ...], device: torch.device) -> _Layout:
    return _Layout(shapes, device)


@torch.no_grad()
def _clip_same_device(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    clipping: float,
    eps: float,
    norm_dtype: torch.dtype,
    skip_unclipped: bool,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """AGC on tensors that share a device and a norm dtype; ``grad_scale`` is the loss scale
    the gradients still carry (None: they carry none).

    Weight norms come from the Scaled-WS forward's statistics where it left them
    (:func:`normfree.nn.unit_norms.unit_norms_from_forward`), which saves one pass over those
    weights; gradient norms from the native Scaled-WS backward where it summed them
    (:func:`normfree.nn.unit_norms.unit_grad_norms_from_backward`), which saves one pass over
    those gradients.
    Per-unit norms of the other matrices/kernels and of every gradient take one reduction kernel
    per tensor (the minimum memory traffic: every element is read once); the norms of all
    ``ndim ≤ 1`` tensors (params and grads) take one ``_foreach_norm``. Every unit's norm
    then goes into one flat vector, the clip factors are computed for all units at once and
    applied with one ``_foreach_mul_``. With ``skip_unclipped`` (CPU, where a host sync is free
    and bandwidth is the cost) tensors with no clipped unit are not touched.
    """
    layout = _layout(tuple(p.shape for p in params), grads[0].device)
    param_norms: list[torch.Tensor] = []
    grad_norms: list[torch.Tensor] = []
    known_norms = unit_norms_from_forward([params[i] for i in layout.big])
    known_grad_norms = unit_grad_norms_from_backward(
        [params[i] for i in layout.big], [grads[i] for i in layout.big]
    )
    for i, dims, known, known_grad in zip(
        layout.big, layout.reduce_dims, known_norms, known_grad_norms
    ):
        if known is None:
            known = torch.linalg.vector_norm(params[i], 2, dim=dims, dtype=norm_dtype)
        if known_grad is None:
            known_grad = torch.linalg.vector_norm(grads[i], 2, dim=dims, dtype=norm_dtype)
        param_norms.append(known)
        grad_norms.append(known_grad)
    if layout.small:
        both = [params[i] for i in layout.small] + [grads[i] for i in layout.small]
        small_params, small_grads = torch.stack(
            torch._foreach_norm(both, 2, dtype=norm_dtype)
        ).chunk(2)
        param_norms.append(small_params)
        grad_norms.append(small_grads)
    param_norm = torch.cat(param_norms).to(norm_dtype)
    grad_norm = torch.cat(grad_norms)

    max_norm = param_norm.clamp_min_(eps).mul_(clipping)
    min_grad_norm: float | torch.Tensor = _MIN_GRAD_NORM
    if grad_scale is not None:  # G·S clipped at λ‖W‖·S: the same factor as G at λ‖W‖
        grad_scale = grad_scale.to(max_norm.device, max_norm.dtype)
        max_norm.mul_(grad_scale)
        min_grad_norm = grad_scale * _MIN_GRAD_NORM
    clipped = grad_norm > max_norm
    scale = torch.where(clipped, max_norm / grad_norm.clamp_min(min_grad_norm), 1.0)

    if skip_unclipped:
        # clipped units so far at the end of each tensor; a tensor has some where this grows
        ends = clipped.cumsum(0)[layout.ends].tolist()
        keep = [k for k, (end, start) in enumerate(zip(ends, [0, *ends])) if end > start]
    else:
        keep = range(len(layout.order))
    targets = [grads[layout.order[k]] for k in keep]
    factors = [
        scale[layout.starts[k] : layout.starts[k + 1]].view((-1,) + (1,) * (g.ndim - 1))
        if g.ndim >= 2
        else scale[layout.starts[k]]
        for k, g in zip(keep, targets)
    ]
    if targets:
        torch._foreach_mul_(targets, factors)


def _collect(parameters: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(parameters, nn.Module):
        raise TypeError("pass the model's parameters (model.parameters()), not the model")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    out = []
    seen: set[int] = set()
    for p in parameters:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameters must be tensors, got {type(p).__name__}")
        grad = p.grad
        if grad is None or id(p) in seen or not p.numel():
            continue  # a parameter listed twice is clipped once (clipping is idempotent)
        seen.add(id(p))
        if grad.is_sparse:
            raise ValueError("adaptive gradient clipping does not support sparse gradients")
        if grad.shape != p.shape:
            raise ValueError(f"gradient shape {tuple(grad.shape)} != parameter {tuple(p.shape)}")
        out.append(p)
    return out


def _adaptive_clip_grad(
    params: list[torch.Tensor],
    clipping: float,
    eps: float,
    skip_unclipped: bool | None = None,
    grad_scale: torch.Tensor | None = None,
) -> None:
    # one pass: each gradient read once; a model's parameters share one device and dtype,
    # so the usual call is a single group
    if not params:
        return
    grads = [p.grad for p in params]
    keys = [(g.device, _norm_dtype(p, g)) for p, g in zip(params, grads)]
    groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]]
    if all(k == keys[0] for k in keys):
        groups = {keys[0]: (params, grads)}
    else:
        groups = defaultdict(lambda: ([], []))
        for p, g, k in zip(params, grads, keys):
            groups[k][0].append(p)
            groups[k][1].append(g)
    for (device, norm_dtype), (group, group_grads) in groups.items():
        skip = device.type == "cpu" if skip_unclipped is None else skip_unclipped
        _clip_same_device(
            group,  # read only (under no_grad); kept undetached: the WS statistics key on them
            [g.detach() if g.requires_grad else g for g in group_grads],
            clipping,
            eps,
            norm_dtype,
            skip,
            grad_scale,
        )


def adaptive_clip_grad_(
    parameters: torch.Tensor | Iterable[torch.Tensor], clipping: float = 0.01, eps: float = 1e-3
) -> None:
    """Clip the gradients of ``parameters`` in place, unit-wise (Brock et al. 2021b, Eq. 3).

    ``max_norm = clipping·max(‖W_i‖, eps)``; units with ``‖G_i‖ > max_norm`` are rescaled by
    ``max_norm/max(‖G_i‖, 1e-6)``. Parameters whose ``.grad`` is None are skipped. Call it after
    ``GradScaler.unscale_`` when training with a scaler.
    """
    clipping, eps = _check_clipping(clipping, eps)
    params = _collect(parameters)
    if params:
        _adaptive_clip_grad(params, clipping, eps)


ClassifierClipping = bool | Literal["bias"]


def unclipped_classifier(
    model: nn.Module, clip_classifier: ClassifierClipping = False
) -> list[str]:
    """The classifier parameters AGC leaves alone, of ``model.classifier_parameter_names()``
    (none when the model declares no classifier):

    * ``False`` (the default): the whole final linear layer, after the paper's "it is always
      better not to clip the final linear layer" (Brock et al. 2021b, §4.1), as timm's ports;
    * ``"bias"``: only its weight, as DeepMind's ``experiment_nfnets.py`` (its bias falls in
      the gains-and-biases group, clipped at λ; the ``nfnet_imagenet`` recipe's choice);
    * ``True``: nothing (the classifier is clipped like every other layer).

    The choice matters at small learning rates: with the bias clipped, a zero-initialised
    bias moves by at most ``lr·λ·ε`` per step. NF-ResNet-20 of the small-batch experiment
    lost 6 points at batch 4 (docs/experiments.md)."""
    if clip_classifier not in (False, True, "bias"):
        raise ValueError(f"clip_classifier must be False, True or 'bias', got {clip_classifier!r}")
    declared = getattr(model, "classifier_parameter_names", None)
    if declared is None or clip_classifier is True:
        return []
    names = list(declared())
    if clip_classifier is False:
        return names
    params = dict(model.named_parameters(remove_duplicate=False))
    return [name for name in names if name in params and params[name].ndim >= 2]


def _resolve_exclusions(model: nn.Module | None, exclude: ExcludeSpec) -> list[str]:
    """Names of the parameters of ``model`` that ``exclude`` selects (see :class:`AGC`)."""
    if exclude is None:
        return [] if model is None else unclipped_classifier(model)
    if callable(exclude):
        if model is None:
            raise ValueError("an exclude predicate needs model= to name the parameters")
        named = model.named_parameters(remove_duplicate=False)  # tied weights by every name
        return [name for name, p in named if exclude(name, p)]
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"exclude entries must be names or patterns, got {pattern!r}")
    if not patterns:
        return []
    if model is None:
        raise ValueError("exclude by name needs model= so that names can be resolved")
    named = list(model.named_parameters(remove_duplicate=False))
    selected = []
    for pattern in patterns:
        hits = [name for name, _ in named if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(f"exclude pattern {pattern!r} matches no parameter of the model")
        selected.extend(h for h in hits if h not in selected)
    return selected


class AGC:
    """Adaptive gradient clipping attached to ``optimizer`` through PyTorch's public step hooks.

    ``AGC(optimizer, ...)`` (or :func:`attach_agc`) registers a step pre-hook
    (``Optimizer.register_step_pre_hook``) that clips the gradients right before every
    ``optimizer.step()``; the optimizer stays the user's own object, so LR schedulers,
    ``GradScaler`` and ``state_dict``/``load_state_dict`` (which carry each group's
    ``"clipping"``) are untouched. Under ``scaler.step(optimizer)`` an ordinary optimizer's
    gradients are unscaled before the pre-hook clips them, and a step skipped for inf/NaN never
    reaches the hook; a fused optimizer (``fused=True``) gets its gradients still scaled, with
    the scale as ``optimizer.grad_scale``, so the hook scales its thresholds by it (the same
    clipping), and the hook runs on an inf/NaN step too, whose update the fused kernel then
    skips (``found_inf``).
    A closure passed to ``step`` is wrapped so that the gradients it computes are clipped before
    the update uses them. :meth:`remove` detaches the hook.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        clipping: λ for every param group without its own ``"clipping"`` key (written into the
            groups present now; groups added later read it at each step); a group whose
            ``"clipping"`` is None is not clipped.
        eps: ε, the floor of the parameter norm.
        exclude: parameters never clipped, resolved once with ``model.named_parameters()``:
            names / ``fnmatch`` patterns (each must match something) or a predicate
            ``(name, param) -> bool``. ``None`` excludes ``model.classifier_parameter_names()``
            when the model declares it (normfree models do; the paper never clips the final
            linear layer), otherwise nothing. Pass ``()`` to clip everything, or
            ``unclipped_classifier(model, "bias")`` to clip the classifier's bias as DeepMind's
            code does.
        model: the module owning the parameters (needed for exclusion by name).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude: ExcludeSpec = None,
        model: nn.Module | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        self.optimizer = optimizer
        self.clipping, self.eps = _check_clipping(clipping, eps)
        self.excluded_names: list[str] = _resolve_exclusions(model, exclude)
        named = dict(model.named_parameters(remove_duplicate=False)) if model is not None else {}
        self.excluded_ids = frozenset(id(named[n]) for n in self.excluded_names)
        for group in optimizer.param_groups:
            group.setdefault("clipping", self.clipping)
            if group["clipping"] is not None:
                _check_clipping(group["clipping"], self.eps)
        self.handle = optimizer.register_step_pre_hook(before_step_hook(self.clip_grad_))
        record_attached(optimizer, self)

    def __repr__(self) -> str:
        return f"AGC(clipping={self.clipping}, eps={self.eps}, excluded={self.excluded_names})"

    def remove(self) -> None:
        """Detach the hook: later steps are not clipped."""
        self.handle.remove()
        record_attached(self.optimizer, self, attached_now=False)

    @torch.no_grad()
    def clip_grad_(self) -> None:
        """Apply AGC to the gradients of every clipped group's non-excluded parameters.

        Inside ``GradScaler.step`` of a fused optimizer the gradients are still scaled, and the
        scaler has put the scale on the optimizer as ``grad_scale`` for the fused kernel to
        unscale with; the thresholds are scaled by it (see the module docstring)."""
        grad_scale = getattr(self.optimizer, "grad_scale", None)
        if grad_scale is not None:
            grad_scale = torch.as_tensor(grad_scale)
        by_clipping: dict[float, list[torch.Tensor]] = defaultdict(list)
        for group in self.optimizer.param_groups:
            clipping = group.get("clipping", self.clipping)
            if clipping is None:
                continue
            by_clipping[float(clipping)].extend(
                p for p in group["params"] if id(p) not in self.excluded_ids
            )
        for clipping, params in by_clipping.items():
            params = _collect(params)
            if params:
                _adaptive_clip_grad(params, clipping, self.eps, grad_scale=grad_scale)


def attach_agc(
    optimizer: Optimizer,
    clipping: float = 0.01,
    eps: float = 1e-3,
    exclude: ExcludeSpec = None,
    model: nn.Module | None = None,
) -> AGC:
    """Clip ``optimizer``'s gradients with AGC before every step; returns the :class:`AGC`
    (its :meth:`~AGC.remove` detaches the hook)::

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        agc = normfree.optim.attach_agc(opt, clipping=0.01, model=model)
    """
    return AGC(optimizer, clipping=clipping, eps=eps, exclude=exclude, model=model)
