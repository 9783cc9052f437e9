"""Classifier head: global pool → dropout → linear."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["POOL_TYPES", "ClassifierHead", "global_pool_2d"]

#: Global pooling types, with timm's names and meanings: ``"avg"`` spatial mean, ``"max"``
#: spatial max, ``"avgmax"`` their average, ``"catavgmax"`` both concatenated (2× features) and
#: ``""`` no pooling (the feature map goes through; only without a classifier).
POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")


def _check_pool(global_pool: str) -> str:
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
    return global_pool


def global_pool_2d(x: torch.Tensor, pool_type: str = "avg") -> torch.Tensor:
    """Pool ``(N, C, H, W)`` over H and W: ``(N, C)`` (``(N, 2C)`` for ``"catavgmax"``);
    ``pool_type=""`` returns ``x`` unchanged."""
    if pool_type == "avg":
        return x.mean(dim=(2, 3))
    if pool_type == "max":
        return x.amax(dim=(2, 3))
    if pool_type == "avgmax":
        return 0.5 * (x.mean(dim=(2, 3)) + x.amax(dim=(2, 3)))
    if pool_type == "catavgmax":
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
    return x


class ClassifierHead(nn.Module):
    """``fc(dropout(pool(x)))``.

    ``init_std`` > 0 draws ``fc.weight`` from N(0, init_std²) (0.01 in NF-ResNet/NFNet,
    Brock et al. 2021a/b); ``init_std == 0`` zero-initialises it (NF-RegNet, Fixup). The bias is 0.
    ``num_classes == 0`` gives an identity classifier (pooled features out). ``global_pool`` is
    one of :data:`POOL_TYPES` (default ``"avg"``, the spatial mean of every normfree model);
    ``""`` (no pooling) needs ``num_classes == 0``, as in timm.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        drop_rate: float = 0.0,
        init_std: float = 0.01,
        global_pool: str = "avg",
    ) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be an int >= 1, got {in_features!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        if not 0.0 <= init_std < math.inf:
            raise ValueError(f"init_std must be a finite number >= 0, got {init_std!r}")
        super().__init__()
        self.in_features = in_features
        self.drop_rate = float(drop_rate)
        self.init_std = float(init_std)
        self.global_pool = _check_pool(global_pool)
        self.dropout = nn.Dropout(self.drop_rate)
        self.fc: nn.Module = nn.Identity()
        self.reset(num_classes)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features if isinstance(self.fc, nn.Linear) else 0

    @property
    def pooled_features(self) -> int:
        """Width of the pooled features (the classifier's input): ``in_features``, doubled by
        ``"catavgmax"``."""
        return self.in_features * (2 if self.global_pool == "catavgmax" else 1)

    def reset(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` classes;
        ``global_pool`` changes the pooling (``None`` keeps it)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        pool = self.global_pool if global_pool is None else _check_pool(global_pool)
        if not pool and num_classes:
            raise ValueError(
                "global_pool='' (no pooling) needs num_classes=0: a linear classifier needs "
                "pooled features"
            )
        self.global_pool = pool
        device = next(self.parameters(), torch.empty(0)).device
        fc = nn.Linear(self.pooled_features, num_classes, device=device) if num_classes else None
        self.fc = fc if fc is not None else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if isinstance(self.fc, nn.Linear):
            with torch.no_grad():
                if self.init_std > 0:
                    self.fc.weight.normal_(0.0, self.init_std)
                else:
                    self.fc.weight.zero_()
                self.fc.bias.zero_()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(global_pool_2d(x, self.global_pool))
        return x if pre_logits else self.fc(x)

    def extra_repr(self) -> str:
        return f"global_pool={self.global_pool!r}, drop_rate={self.drop_rate:g}"
