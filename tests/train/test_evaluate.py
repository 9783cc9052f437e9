"""Evaluation metrics: top-1/top-5 with tied logits, NaN logits and a last partial batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normfree.train.evaluate import evaluate, target_rank


class _Fixed(nn.Module):
    """Returns the logits stored for each input index (the input is that index)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.long()]


def _metrics(logits: torch.Tensor, labels: torch.Tensor, batch: int = 7) -> dict[str, float]:
    ds = TensorDataset(torch.arange(len(labels)), labels)
    return evaluate(_Fixed(logits), DataLoader(ds, batch_size=batch), torch.device("cpu"))


def _stable_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rank of the label in a stable descending sort: ties in class-index order."""
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    return (order == labels[:, None]).int().argmax(dim=1)


def test_tied_logits_rank_by_class_index_as_argmax() -> None:
    """``topk`` orders equal logits arbitrarily (all-zero logits of 10 classes put class 8
    first on CPU, and [3, 4, 1, 0, 2] first of 1000), so top-1/top-5 of a zero-initialised
    classifier, or of bf16 logits, depended on the device and the class count and disagreed
    with the training loop's argmax accuracy. Ties now go to the lower class index."""
    zeros = torch.zeros(12, 10)
    labels = torch.tensor([0] * 6 + [4] * 3 + [5] * 3)
    m = _metrics(zeros, labels)
    assert m["top1"] == 100.0 * 6 / 12 and m["top5"] == 100.0 * 9 / 12
    assert m["count"] == 12
    # coarse logits (many ties, as bf16 gives): exact agreement with argmax and a stable sort
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 4, (203, 1000), generator=g).float()
    labels = torch.randint(0, 1000, (203,), generator=g)
    labels[:50] = coarse[:50].argmax(dim=1)  # some top-1 hits
    rank = _stable_rank(coarse, labels)
    assert torch.equal(target_rank(coarse, labels), rank)
    m = _metrics(coarse, labels, batch=16)  # 203 = 12·16 + 11: a last partial batch
    assert m["count"] == 203
    assert m["top1"] == 100.0 * (coarse.argmax(dim=1) == labels).sum().item() / 203
    assert m["top5"] == 100.0 * (rank < 5).sum().item() / 203
    assert m["loss"] == pytest.approx(nn.functional.cross_entropy(coarse, labels).item(), rel=1e-6)


def test_a_nan_logit_is_a_miss() -> None:
    """A row with a NaN logit is not counted correct (``topk`` put the NaN class first, so a
    diverged model's NaN logit on the true class scored a hit)."""
    logits = torch.tensor([[float("nan"), 0.0, 1.0], [0.0, 2.0, 1.0], [float("nan")] * 3])
    labels = torch.tensor([0, 1, 2])
    miss = torch.iinfo(torch.int64).max
    assert target_rank(logits, labels).tolist() == [miss, 0, miss]
    m = _metrics(logits, labels)
    assert m["top1"] == 100.0 / 3 and m["top5"] == 100.0 / 3
