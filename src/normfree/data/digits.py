"""scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes; Alpaydin & Kaynak
1998, the UCI "optdigits" test set). Shipped inside scikit-learn, so nothing is downloaded."""

from __future__ import annotations

import torch
from torch import Tensor

from normfree.data._optional import require_sklearn_datasets

__all__ = ["load_digits_arrays"]


def load_digits_arrays() -> tuple[Tensor, Tensor]:
    """``(images, labels)``: float32 ``(1797, 1, 8, 8)`` in [0, 1] (raw 0–16 counts ÷ 16) and
    int64 ``(1797,)``."""
    datasets = require_sklearn_datasets("the 'digits' dataset")
    bunch = datasets.load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels
