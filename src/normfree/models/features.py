"""Feature extractors: timm's ``features_only=True`` models over :meth:`forward_intermediates`.

:class:`FeatureExtractor` follows timm's ``FeatureGetterNet``: it prunes the layers the chosen
feature maps do not need (:meth:`NormFreeModel.prune_intermediate_layers`), keeps the network as
``self.model`` and returns ``model.forward_intermediates(x, indices=out_indices,
intermediates_only=True)``, a list of ``(N, C_i, H/r_i, W/r_i)`` maps whose channels and
reductions are ``feature_info.channels()`` / ``feature_info.reduction()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from normfree.models.base import FeatureInfo, FeatureInfoList, NormFreeModel, feature_take_indices

__all__ = ["FeatureExtractor"]


class FeatureExtractor(nn.Module):
    """A backbone returning the feature maps ``out_indices`` of a :class:`NormFreeModel`.

    Args:
        model: the network (modified in place when ``prune``).
        out_indices: which feature maps, with timm's rule: ``None`` all of them (index 0 is
            the stem output, index ``i`` the output of stage ``i - 1``), an int ``n`` the last
            ``n``, a sequence those indices (negative ones count from the end).
        norm: apply the model's ``final`` module to the last feature map when it is taken.
        prune: drop the layers no feature map needs (the classifier always goes).
    """

    def __init__(
        self,
        model: NormFreeModel,
        out_indices: int | Sequence[int] | None = None,
        norm: bool = False,
        prune: bool = True,
    ) -> None:
        super().__init__()
        last = len(model.stages)
        if out_indices is None:
            out_indices = tuple(range(len(model.feature_info)))
        if prune:
            take = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        else:
            take, _ = feature_take_indices(last + 1, out_indices)
        infos = [FeatureInfo(**info) for info in model.feature_info]
        if norm and last in take:
            infos[last] = FeatureInfo(**{**infos[last], "num_chs": model.num_features})
        self.model = model
        self.out_indices = tuple(take)
        self.norm = bool(norm)
        self.feature_info = FeatureInfoList(infos, self.out_indices)
        self.pretrained_cfg: dict[str, Any] = dict(model.pretrained_cfg)
        self.default_cfg = self.pretrained_cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            x, indices=list(self.out_indices), norm=self.norm, intermediates_only=True
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def extra_repr(self) -> str:
        return f"out_indices={self.out_indices}, norm={self.norm}"
