"""Inference form of a model: every training-only reparameterisation folded away.

* the scales of NF residual blocks (γ, 1/β, α, skip gain; Brock et al. 2021a §3) → multiplied
  into the convs that read or write them (:func:`normfree.nn.prescaled.bake_block_scales`), so
  no scale costs a pass over an activation;
* Scaled Weight Standardization (Brock et al. 2021a, eq. 2; Qiao et al. 2019) → the plain conv
  with the standardized weight (:func:`normfree.nn.fold_weight_standardization`);
* Proxy Normalization (Labatie et al. 2021, eq. 5) → per-channel affine + activation +
  per-channel affine (:func:`normfree.nn.fold_proxy_norm`);
* stochastic depth, dropout and MSR channel noise are identities in eval mode.

The result computes what ``model.eval()`` computes, with fewer operations per call.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn

from normfree.nn.prescaled import bake_block_scales
from normfree.nn.proxy_norm import ProxyNormActivation, fold_proxy_norm
from normfree.nn.residual import NFResidualBlock
from normfree.nn.ws import StdConv2dBase, fold_weight_standardization

__all__ = ["folded_module_counts", "prepare_for_inference"]


def folded_module_counts(model: nn.Module) -> dict[str, int]:
    """How many modules :func:`prepare_for_inference` folds, by class name."""
    counts = Counter(
        type(m).__name__
        for m in model.modules()
        if isinstance(m, (StdConv2dBase, ProxyNormActivation))
    )
    return dict(sorted(counts.items()))


def prepare_for_inference(model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """A folded, frozen, eval-mode copy of ``model`` (``model`` itself is left untouched).

    Baking the NF blocks' scales runs one eval forward to record them: on ``example_input``
    (any valid input batch; only its first image is used) when given, else on a zero image of
    the model's own ``in_chans`` and ``meta.test_size`` (:func:`_example_input`). Give it for
    a wrapper whose input the model does not declare.

    Example:
        >>> import torch, normfree
        >>> from normfree.deploy import prepare_for_inference
        >>> model = normfree.create_model("nf_resnet_cifar20").eval()
        >>> fast = prepare_for_inference(model)
        >>> x = torch.randn(2, 3, 32, 32)
        >>> torch.allclose(fast(x), model(x), atol=1e-6)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    folded = copy.deepcopy(model).eval()
    if any(isinstance(m, NFResidualBlock) for m in folded.modules()):
        if example_input is None:
            example = _example_input(folded)
        else:
            param = next(folded.parameters(), None)
            example = example_input[:1].to(
                device=param.device if param is not None else example_input.device,
                dtype=param.dtype if param is not None else example_input.dtype,
            )
        bake_block_scales(folded, example)
    folded = fold_proxy_norm(fold_weight_standardization(folded, inplace=True), inplace=True)
    return folded.requires_grad_(False)


def _example_input(model: nn.Module) -> torch.Tensor:
    """One image for the recording forward of :func:`bake_block_scales`: the ``in_chans`` and
    ``meta.test_size`` that ``model`` (or, in a wrapper, the outermost module declaring them)
    declares, else the channels of the first conv and 64 pixels; its device and dtype."""
    modules = list(model.modules())
    declared = next((m.in_chans for m in modules
                     if isinstance(getattr(m, "in_chans", None), int)), None)  # fmt: skip
    first = next(m for m in modules if isinstance(m, nn.Conv2d))
    sizes = (getattr(getattr(m, "meta", None), "test_size", None) for m in modules)
    size = int(next((s for s in sizes if isinstance(s, int)), 64))
    w = first.weight
    channels = declared if declared is not None else first.in_channels
    return torch.zeros(1, channels, size, size, device=w.device, dtype=w.dtype)
