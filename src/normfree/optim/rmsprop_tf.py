"""RMSprop as TensorFlow 1 applies it (``tf.compat.v1.train.RMSPropOptimizer``), the optimizer of
the EfficientNet recipes (Tan & Le 2019; Masters et al. 2021, whose Graphcore runs use RMSprop
with ε = 0.001 and decay 0.9).

For a parameter ``w`` with gradient ``g`` (plus ``weight_decay · w``: TensorFlow's L2 term in
the loss), decay ρ, momentum μ and learning rate η::

    ms  ← ρ·ms + (1 − ρ)·g²                                     ms starts at 1
    mg  ← ρ·mg + (1 − ρ)·g                                      (centered only; starts at 0)
    mom ← μ·mom + η·g / √(ms − mg² + ε)                         (mg = 0 unless centered)
    w   ← w − mom

Three things differ from ``torch.optim.RMSprop``: ε is added *inside* the square root, the
squared-gradient average starts at 1 rather than 0 (so the first steps are not divided by a
tiny √ms), and the learning rate enters the momentum buffer, so a change of η by a schedule
acts on new gradients only. With ε = 1e-3, √ε ≈ 0.03 bounds the step of a parameter whose
gradients are all small; ``torch.optim.RMSprop`` with the same ε does not, which is why the
recipes' ε cannot be copied over as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["RMSpropTF"]


class RMSpropTF(Optimizer):
    """RMSprop with TensorFlow 1's update (see the module docstring for the formula).

    Args:
        params: parameters or parameter groups.
        lr: learning rate η.
        alpha: decay ρ of the squared-gradient average (TensorFlow's ``decay``; 0.9 there and in
            the EfficientNet recipes, where ``torch.optim.RMSprop`` defaults to 0.99).
        eps: ε, added to the average inside the square root (TensorFlow's ``epsilon``).
        momentum: μ.
        weight_decay: L2 coefficient added to the gradient (``g + λ·w``), as an L2 term of the
            loss does in TensorFlow.
        centered: subtract the square of the mean gradient from the average (TensorFlow's
            ``centered=True``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        alpha: float = 0.9,
        eps: float = 1e-10,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        centered: bool = False,
    ) -> None:
        for name, value, low, high in (("lr", lr, 0.0, None), ("alpha", alpha, 0.0, 1.0),
                                       ("eps", eps, 0.0, None), ("momentum", momentum, 0.0, None),
                                       ("weight_decay", weight_decay, 0.0, None)):  # fmt: skip
            if not (value >= low and (high is None or value <= high)):
                bound = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise ValueError(f"RMSpropTF: {name} must be {bound}, got {value}")
        defaults = dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum,
                        weight_decay=weight_decay, centered=bool(centered))  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter with a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            momentum, decay, centered = group["momentum"], group["weight_decay"], group["centered"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RMSpropTF does not support sparse gradients")
                grad = p.grad if decay == 0 else p.grad.add(p, alpha=decay)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["square_avg"] = torch.ones_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                square_avg = state["square_avg"]
                square_avg.mul_(alpha).addcmul_(grad, grad, value=1.0 - alpha)
                if centered:  # (each buffer made when first needed: a group may switch it on)
                    grad_avg = state.setdefault("grad_avg", torch.zeros_like(square_avg))
                    grad_avg.mul_(alpha).add_(grad, alpha=1.0 - alpha)
                    denom = square_avg.addcmul(grad_avg, grad_avg, value=-1.0).add_(eps).sqrt_()
                else:
                    denom = square_avg.add(eps).sqrt_()
                if momentum > 0:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(square_avg))
                    buf.mul_(momentum).addcdiv_(grad, denom, value=lr)
                    p.sub_(buf)
                else:
                    p.addcdiv_(grad, denom, value=-lr)
        return loss
