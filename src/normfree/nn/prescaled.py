"""Inference convs that carry a residual block's scales in their weights.

In the folded form of an NF residual block (:class:`~normfree.nn.residual.NFResidualBlock`)
γ, 1/β, α and the skip gain reach the Scaled-WS convs as arguments of
:meth:`~normfree.nn.ScaledStdConv2d.forward_scaled` and are multiplied into the standardized
weight on every call. At inference all of them are constants, so :func:`bake_block_scales`
multiplies them into the weights once: each such conv becomes a :class:`PrescaledConv2d` (a
plain ``nn.Conv2d`` whose weight is ``in_scale·s·Ŵ`` and bias ``s·b``, ``s = out_scale·g``) and
the block keeps running its folded form, with no O(activation) scale left. Exact up to float
rounding (a convolution is linear). Used by :func:`normfree.deploy.prepare_for_inference`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normfree.nn.padding import Conv2dSame
from normfree.nn.pointwise_conv import _PointwiseForms
from normfree.nn.residual import NFResidualBlock
from normfree.nn.ws import ScaledStdConv2d

__all__ = ["PrescaledConv2d", "PrescaledConv2dSame", "bake_block_scales"]


class _Prescaled:
    """``forward_scaled`` of a conv whose weight already holds the scales its block passes: it
    takes :meth:`ScaledStdConv2d.forward_scaled`'s scale arguments and ignores them."""

    def forward_scaled(self, x: Tensor, *scales: Any, **named_scales: Any) -> Tensor:
        return self(x)  # type: ignore[operator]


class PrescaledConv2d(_Prescaled, _PointwiseForms, nn.Conv2d):
    """A plain conv holding ``in_scale·out_scale·g·Ŵ`` (:func:`bake_block_scales`); 1×1 convs
    run in the faster CPU forms of :mod:`normfree.nn.pointwise_conv`."""


class PrescaledConv2dSame(_Prescaled, Conv2dSame):
    """:class:`PrescaledConv2d` with dynamic ``"SAME"`` padding (never 1×1: a 1×1 kernel needs
    no padding)."""


def _record_calls(
    model: nn.Module, example: Tensor
) -> tuple[dict[ScaledStdConv2d, list[tuple]], set[int]]:
    """Every ``forward_scaled`` call of every Scaled-WS conv in one eval forward of ``model``,
    and the ids of the NF residual blocks that ran their folded form in it (a block whose
    ``branch_folded`` returns None runs its plain form, and its convs get no scales)."""
    calls: dict[ScaledStdConv2d, list[tuple]] = {}
    folded: set[int] = set()
    convs = [m for m in model.modules() if isinstance(m, ScaledStdConv2d)]
    blocks = [m for m in model.modules() if isinstance(m, NFResidualBlock)]

    def recorder(conv: ScaledStdConv2d) -> Any:
        method = type(conv).forward_scaled

        def record(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            calls.setdefault(conv, []).append((args, kwargs))
            return method(conv, x, *args, **kwargs)

        return record

    def folded_recorder(block: NFResidualBlock) -> Any:
        method = type(block)._forward_folded

        def record(x: Tensor) -> Tensor | None:
            out = method(block, x)
            if out is not None:
                folded.add(id(block))
            return out

        return record

    for conv in convs:
        conv.forward_scaled = recorder(conv)  # type: ignore[method-assign]
    for block in blocks:
        block._forward_folded = folded_recorder(block)  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for conv in convs:
            del conv.forward_scaled
        for block in blocks:
            del block._forward_folded
    return calls, folded


def _prescaled(conv: ScaledStdConv2d, args: tuple, kwargs: dict[str, Any]) -> nn.Conv2d:
    with torch.no_grad():
        weight_bias = conv.effective_weight_bias(*args, **kwargs)
    return conv.to_conv2d(weight_bias, (PrescaledConv2d, PrescaledConv2dSame))


def bake_block_scales(model: nn.Module, example: Tensor) -> nn.Module:
    """Multiply the constant scales of every folded NF residual block into its convs, in place.

    ``model`` must be in eval mode; ``example`` is any valid input batch (one eval forward
    records which scales each conv receives). A conv called more than once, or outside a
    foldable block, is left as it is. Blocks that ran their folded form and had scales baked
    refuse their plain form (it would apply the scales a second time): the result is for
    inference and export only. Blocks that ran their plain form (a subclass without
    ``branch_folded``, an activation that is not a ``ScaledActivation``, a conv already plain)
    get their Scaled-WS convs folded to plain convs and keep working."""
    if model.training:
        raise ValueError("bake_block_scales needs an eval-mode model (call model.eval())")
    calls, folded = _record_calls(model, example)
    for block in model.modules():
        if not isinstance(block, NFResidualBlock) or not block.fold_scales:
            continue
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, ScaledStdConv2d) and len(calls.get(child, ())) == 1:
                    args, kwargs = calls[child][0]
                    setattr(parent, name, _prescaled(child, args, kwargs))
                    # a block that ran its plain form passed its convs no scales: they hold
                    # only the standardized weight, and the plain form stays valid
                    block.scales_baked = block.scales_baked or id(block) in folded
    return model
