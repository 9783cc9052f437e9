"""Mean Shift Rejection: keep conv weights on the zero-mean isocline (Ruff et al. 2019, §3 (2)).

Let ``P`` be the orthogonal projection onto the zero-mean subspace of a conv kernel: subtract
the mean of every spatial slice ``W[o, i, ...]`` (k×k kernels) or of every filter over its input
channels (1×1 kernels); see :func:`normfree.nn.msr.kernel_mean_dims`. The paper subtracts "the
weighted channel-wise mean of the spatial kernel gradients" at every step. The authors' code has
two versions that disagree (``trainer.ZeroMeanNormaliseGrads`` in the ``pytorch_resnet_cifar10/``
code of the authors' repository, commit ``b5fc345``: an ``ORIG`` branch and a current one):

* ``ORIG``: ``g ← g − m·mean(g)`` with ``m = 0.99``: leaves 1 % of the mean, so the weights
  drift off the isocline, slowly;
* the later "current" one: ``g ← (1+m)·g − m·mean(g) = g + m·(g − mean(g))``. Its mean is
  ``mean(g)``, *unchanged*: it amplifies the zero-mean part and removes nothing, so the weights
  drift exactly as without MSR (``tests/optim/test_msr.py`` shows it).

normfree implements the version that keeps the weights **exactly** zero-mean, ``m = 1``:
``g ← P(g)``. What must be zero-mean is the *update*, not only the gradient:

* ``mode="project_grad"``: project the gradients before the inner step. Exact for optimizers
  whose update is a linear combination of gradients and weights (SGD with any momentum,
  Nesterov, L2 or decoupled weight decay), provided the weights start on the isocline
  (:func:`normfree.nn.msr.zero_mean_init_`). Not exact for Adam/AdamW/RMSprop…: the elementwise
  ``1/√v`` scaling of a zero-mean gradient is not zero-mean.
* ``mode="project_update"``: project the gradients, step, then re-project the weights,
  ``w ← P(w)``. For ``w`` on the isocline this equals ``w + P(Δw)``: the update itself is
  projected, exact for any optimizer (and it snaps weights that were not zero-mean onto the
  isocline at the first step).

:func:`attach_msr` (or :class:`MeanShiftRejection`) attaches the projection to any optimizer through
its public step hooks and composes with :func:`normfree.optim.attach_agc` in either order: AGC
rescales whole filters by a scalar, which maps the zero-mean subspace to itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from normfree.nn.msr import IncludeSpec, kernel_mean_dims, zero_mean_conv_weights
from normfree.optim.hooks import after_step_hook, before_step_hook, record_attached

__all__ = ["MeanShiftRejection", "attach_msr", "project_zero_mean_", "zero_mean_eligible"]

Mode = Literal["project_grad", "project_update"]
_MODES = ("project_grad", "project_update")


def zero_mean_eligible(t: Tensor) -> bool:
    """Whether ``t`` can be constrained: a conv kernel ``(O, I, *kernel)`` that is not a 1×1
    kernel with a single input channel."""
    return t.ndim >= 3 and (math.prod(t.shape[2:]) > 1 or t.shape[1] > 1)


@torch.no_grad()
def project_zero_mean_(tensors: Tensor | Iterable[Tensor]) -> None:
    """Project each conv kernel (or gradient) onto the zero-mean subspace, in place:
    ``t ← t − mean(t)`` over the spatial axes of every slice (k×k) or over the input channels
    of every filter (1×1). The mean is accumulated in float32 (float64 for float64)."""
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"expected tensors, got {type(t).__name__}")
        if t.is_sparse:
            raise ValueError("project_zero_mean_ does not support sparse tensors")
        dims = kernel_mean_dims(t.shape)
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        t.sub_(t.mean(dim=dims, keepdim=True, dtype=acc).to(t.dtype))


class MeanShiftRejection:
    """Keep the selected conv kernels of ``optimizer``'s parameters zero-mean, through PyTorch's
    public step hooks (``register_step_pre_hook`` projects the gradients before every step;
    with ``mode="project_update"`` a ``register_step_post_hook`` re-projects the weights after).

    ``MeanShiftRejection(optimizer, ...)`` (or :func:`attach_msr`) attaches the hooks; the
    optimizer stays the user's own object, so LR schedulers, ``GradScaler``
    (``scaler.step(optimizer)``) and ``state_dict`` work unchanged, and it composes with
    :class:`~normfree.optim.AGC` attached in either order. :meth:`remove` detaches the hooks.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        params: which kernels to constrain. ``None``: every eligible tensor
            (:func:`zero_mean_eligible`) of the param groups whose ``"zero_mean"`` key is not
            False, resolved at each step (so ``add_param_group`` is followed). An ``nn.Module``:
            its convs selected by ``include`` (:func:`normfree.nn.msr.zero_mean_conv_weights`).
            An iterable of tensors: exactly those (each must be in the optimizer).
        mode: ``"project_grad"`` or ``"project_update"`` (module docstring): use
            ``"project_update"`` with adaptive optimizers (Adam, AdamW, RMSprop, LAMB…).
        include: conv selection when ``params`` is a module.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        params: nn.Module | Iterable[Tensor] | None = None,
        mode: Mode = "project_grad",
        include: IncludeSpec = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.optimizer = optimizer
        self.mode: Mode = mode
        self.params: list[Tensor] | None = self._resolve(params, include)
        self.handles = [optimizer.register_step_pre_hook(before_step_hook(self.project_grad_))]
        if mode == "project_update":
            self.handles.append(
                optimizer.register_step_post_hook(after_step_hook(self.project_weights_))
            )
        record_attached(optimizer, self)

    def _resolve(
        self, params: nn.Module | Iterable[Tensor] | None, include: IncludeSpec
    ) -> list[Tensor] | None:
        if params is None:
            if include is not None:
                raise ValueError("include= selects convs of a module: pass the model as params")
            return None
        if isinstance(params, nn.Module):
            selected = [w for _, w in zero_mean_conv_weights(params, include)]
        else:
            if include is not None:
                raise ValueError("include= only applies when params is an nn.Module")
            selected = [params] if isinstance(params, Tensor) else list(params)
            for p in selected:
                if not isinstance(p, Tensor):
                    raise TypeError(f"params must be tensors, got {type(p).__name__}")
                kernel_mean_dims(p.shape)
        owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [tuple(p.shape) for p in selected if id(p) not in owned]
        if missing:
            raise ValueError(f"{len(missing)} selected kernels are not in the optimizer: {missing}")
        return selected

    def __repr__(self) -> str:
        which = "all conv kernels" if self.params is None else f"{len(self.params)} kernels"
        return f"MeanShiftRejection(mode={self.mode!r}, {which})"

    def remove(self) -> None:
        """Detach the hooks: later steps are not projected."""
        for handle in self.handles:
            handle.remove()
        record_attached(self.optimizer, self, attached_now=False)

    # -- projection ---------------------------------------------------------------------------
    def constrained_parameters(self) -> list[Tensor]:
        """The kernels kept zero-mean (resolved now when ``params`` was None)."""
        if self.params is not None:
            return list(self.params)
        return [
            p
            for group in self.optimizer.param_groups
            if group.get("zero_mean", True)
            for p in group["params"]
            if zero_mean_eligible(p)
        ]

    @torch.no_grad()
    def project_grad_(self) -> None:
        """Project the gradients of the constrained kernels (those that have one)."""
        project_zero_mean_([p.grad for p in self.constrained_parameters() if p.grad is not None])

    @torch.no_grad()
    def project_weights_(self) -> None:
        """Project the constrained kernels themselves onto the isocline (no rescaling)."""
        project_zero_mean_(self.constrained_parameters())


def attach_msr(
    optimizer: Optimizer,
    params: nn.Module | Iterable[Tensor] | None = None,
    mode: Mode = "project_grad",
    include: IncludeSpec = None,
) -> MeanShiftRejection:
    """Keep conv kernels zero-mean through ``optimizer``'s step hooks; returns the
    :class:`MeanShiftRejection` (its :meth:`~MeanShiftRejection.remove` detaches the hooks)."""
    return MeanShiftRejection(optimizer, params, mode=mode, include=include)
