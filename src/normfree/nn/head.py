"""Classifier head: global average pool → dropout → linear."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassifierHead"]


class ClassifierHead(nn.Module):
    """``fc(dropout(mean_hw(x)))``.

    ``init_std`` > 0 draws ``fc.weight`` from N(0, init_std²) (0.01 in NF-ResNet/NFNet,
    Brock et al. 2021a/b); ``init_std == 0`` zero-initialises it (NF-RegNet, Fixup). The bias is 0.
    ``num_classes == 0`` gives an identity classifier (pooled features out).
    """

    def __init__(
        self, in_features: int, num_classes: int, drop_rate: float = 0.0, init_std: float = 0.01
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.drop_rate = float(drop_rate)
        self.init_std = float(init_std)
        self.dropout = nn.Dropout(self.drop_rate)
        self.fc: nn.Module = nn.Identity()
        self.reset(num_classes)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features if isinstance(self.fc, nn.Linear) else 0

    def reset(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` classes."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        device = next(self.parameters(), torch.empty(0)).device
        fc = nn.Linear(self.in_features, num_classes, device=device) if num_classes else None
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
        x = x.mean(dim=(2, 3)) if x.dim() == 4 else x
        x = self.dropout(x)
        return x if pre_logits else self.fc(x)
