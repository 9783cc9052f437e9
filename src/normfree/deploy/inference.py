"""Inference form of a model: every training-only reparameterisation folded away.

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

from torch import nn

from normfree.nn.proxy_norm import ProxyNormActivation, fold_proxy_norm
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


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """A folded, frozen, eval-mode copy of ``model`` (``model`` itself is left untouched).

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
    folded = copy.deepcopy(model).eval()
    folded = fold_proxy_norm(fold_weight_standardization(folded, inplace=True), inplace=True)
    return folded.requires_grad_(False)
