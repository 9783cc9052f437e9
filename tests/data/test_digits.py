"""The bundled digits: stratified seeded split, normalisation, resizing, multi-worker loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from normfree.data import AugmentConfig, build_datasets


def _stack(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def test_split_sizes_are_stratified() -> None:
    target = load_digits().target
    counts = np.bincount(target, minlength=10)
    for frac in (0.2, 0.35):
        b = build_datasets("digits", val_fraction=frac)
        expected_val = np.floor(frac * counts + 0.5).astype(int)
        val_counts = np.bincount(b.val.labels.numpy(), minlength=10)
        train_counts = np.bincount(b.train.labels.numpy(), minlength=10)
        assert val_counts.tolist() == expected_val.tolist()
        assert (train_counts + val_counts).tolist() == counts.tolist()
    assert (b.num_classes, b.in_chans, b.image_size, b.test_size) == (10, 1, 8, 8)
    assert b.name == "digits"


def test_split_is_a_partition_fixed_by_seed() -> None:
    raw = torch.as_tensor(load_digits().images, dtype=torch.float32)[:, None] / 16
    a, a2, c = (build_datasets("digits", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.val.images, a2.val.images) and torch.equal(a.val.labels, a2.val.labels)
    assert not torch.equal(a.val.images, c.val.images)
    # every raw image is in exactly one split (match by content; the digits have few duplicates)
    total = torch.cat([a.train.images, a.val.images])
    assert total.shape[0] == raw.shape[0] == 1797
    key = lambda t: sorted(map(bytes, t.reshape(t.shape[0], -1).mul(16).byte().numpy()))  # noqa: E731
    assert key(total) == key(raw)


def test_normalisation_uses_train_statistics() -> None:
    b = build_datasets("digits")
    x, y = _stack(b.train)
    assert x.shape == (len(b.train), 1, 8, 8) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-5
    assert abs(float(x.std(unbiased=False)) - 1.0) < 1e-5
    assert torch.equal(y, b.train.labels)
    # val uses the *train* statistics: its raw values map through the same affine function
    raw_val = b.val.images
    v, _ = _stack(b.val)
    expected = (raw_val - b.mean[0]) / b.std[0]
    torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)
    train_raw = b.train.images.double()
    assert abs(b.mean[0] - float(train_raw.mean())) < 1e-12
    assert abs(b.std[0] - float(train_raw.std(unbiased=False))) < 1e-12


def test_resize_to_a_larger_image_size() -> None:
    b = build_datasets("digits", image_size=16)
    assert (b.image_size, b.test_size) == (16, 16)
    assert b.train[0][0].shape == (1, 16, 16) and b.val[0][0].shape == (1, 16, 16)
    b = build_datasets("digits", image_size=16, test_size=24)
    assert b.val[0][0].shape == (1, 24, 24)


def test_digits_rejects_arguments_and_bad_fraction() -> None:
    with pytest.raises(ValueError, match="takes no argument"):
        build_datasets("digits:/tmp")
    with pytest.raises(ValueError, match="val_fraction"):
        build_datasets("digits", val_fraction=1.0)


def test_multiworker_loader_is_reproducible() -> None:
    b = build_datasets("digits", augment=AugmentConfig(crop="pad", pad=2, flip=True))

    def first_batches() -> list[torch.Tensor]:
        loader = DataLoader(
            b.train,
            batch_size=256,
            shuffle=True,
            num_workers=2,
            generator=torch.Generator().manual_seed(123),
        )
        out, seen = [], 0
        for x, y in loader:
            seen += len(y)
            assert x.shape[1:] == (1, 8, 8) and y.dtype == torch.int64
            out.append(x)
        assert seen == len(b.train)
        return out[:2]

    run1, run2 = first_batches(), first_batches()
    assert all(torch.equal(p, q) for p, q in zip(run1, run2))
    # augmentation really happened: some item differs from its un-augmented version
    plain = build_datasets("digits")
    assert any(not torch.equal(b.train[i][0], plain.train[i][0]) for i in range(8))
