"""``hard-digits``: the fixed, distorted digits of normfree.data.hard_digits."""

from __future__ import annotations

import pytest
import torch

from normfree.data import build_datasets
from normfree.data.hard_digits import load_hard_digits_arrays, parse_hard_digits_spec


def _nearest_centroid_accuracy(spec: str) -> float:
    """Held-out accuracy of the nearest class mean in pixel space: a model-free difficulty gauge."""
    bundle = build_datasets(spec)

    def arrays(ds) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(xs).flatten(1), torch.tensor(ys)

    (xt, yt), (xv, yv) = arrays(bundle.train), arrays(bundle.val)
    centroids = torch.stack([xt[yt == k].mean(0) for k in range(10)])
    return float((torch.cdist(xv, centroids).argmin(1) == yv).float().mean())


def test_hard_digits_is_fixed_and_shaped() -> None:
    a, la = load_hard_digits_arrays()
    b, lb = load_hard_digits_arrays()
    assert a.shape == (1797, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(la, lb)  # the same data on every call
    big, _ = load_hard_digits_arrays(16)
    assert big.shape == (1797, 1, 16, 16)
    bundle = build_datasets("hard-digits:size=16", seed=3)
    assert (bundle.name, bundle.num_classes, bundle.in_chans, bundle.image_size) == (
        "hard-digits", 10, 1, 16)  # fmt: skip
    assert len(bundle.train) + len(bundle.val) == 1797


def test_hard_digits_is_much_harder_than_digits() -> None:
    # measured: digits 0.908, hard-digits 0.577 (seed-0 split)
    easy, hard = _nearest_centroid_accuracy("digits"), _nearest_centroid_accuracy("hard-digits")
    assert easy > 0.85
    assert 0.3 < hard < easy - 0.2  # far from chance (0.1), far below digits


@pytest.mark.parametrize("arg", ["size=4", "size=x", "width=8", "size"])
def test_hard_digits_spec_errors(arg: str) -> None:
    with pytest.raises(ValueError, match="hard-digits"):
        parse_hard_digits_spec(arg)
    with pytest.raises(ValueError, match="hard-digits"):
        build_datasets(f"hard-digits:{arg}")
