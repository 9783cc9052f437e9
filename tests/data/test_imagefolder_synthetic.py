"""Image-folder trees (with and without train/val) and synthetic data."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normfree.data import AugmentConfig, build_datasets
from normfree.data.build import IMAGENET_MEAN_STD
from normfree.data.imagefolder import scan_image_folder


def test_imagefolder_without_split_dirs(tmp_path: Path, make_image_tree: Callable) -> None:
    make_image_tree(tmp_path, ["cat", "ant", "bee"], 5)
    b = build_datasets(f"imagefolder:{tmp_path}", image_size=16, seed=3)
    assert b.classes == ["ant", "bee", "cat"]  # sorted folder names
    assert (b.num_classes, b.in_chans, b.image_size, b.test_size) == (3, 3, 16, 16)
    assert np.bincount(b.val.labels.numpy()).tolist() == [1, 1, 1]  # round(0.2 * 5) per class
    assert len(b.train) == 12 and not set(b.train.files) & set(b.val.files)
    again = build_datasets(f"imagefolder:{tmp_path}", image_size=16, seed=3)
    other = build_datasets(f"imagefolder:{tmp_path}", image_size=16, seed=4)
    assert again.val.files == b.val.files and other.val.files != b.val.files
    x, y = b.val[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert b.classes[y] in Path(b.val.files[0]).parent.name
    assert pickle.loads(pickle.dumps(b.train)).files == b.train.files


def test_imagefolder_with_train_val(tmp_path: Path, make_image_tree: Callable) -> None:
    make_image_tree(tmp_path / "train", ["a", "b"], 4)
    make_image_tree(tmp_path / "val", ["b"], 2)
    aug = AugmentConfig(crop="random_resized", flip=True)
    b = build_datasets(f"imagefolder:{tmp_path}", image_size=12, test_size=20, augment=aug)
    assert (len(b.train), len(b.val)) == (8, 2) and b.val.labels.tolist() == [1, 1]
    assert b.train[0][0].shape == (3, 12, 12) and b.val[1][0].shape == (3, 20, 20)
    make_image_tree(tmp_path / "val", ["zebra"], 1)
    with pytest.raises(ValueError, match="not a class of the training tree"):
        build_datasets(f"imagefolder:{tmp_path}")


def test_eval_is_resize_then_centre_crop(tmp_path: Path) -> None:
    # a 60x80 image: grey border, uniform colour in the central 30x40 region. Short side -> 48
    # (+32 for test 16), centre crop 16: only the central colour survives.
    arr = np.full((60, 80, 3), 90, np.uint8)
    arr[15:45, 20:60] = (200, 30, 120)
    (tmp_path / "c").mkdir()
    Image.fromarray(arr).save(tmp_path / "c" / "x.png")
    Image.fromarray(arr).save(tmp_path / "c" / "y.png")
    b = build_datasets(f"imagefolder:{tmp_path}", image_size=16, val_fraction=0.5)
    x, _ = b.val[0]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET_MEAN_STD)
    expected = (torch.tensor([200, 30, 120]).view(3, 1, 1) / 255 - mean) / std
    torch.testing.assert_close(x, expected.expand(3, 16, 16), rtol=0, atol=1e-6)


def test_imagefolder_errors(tmp_path: Path, make_image_tree: Callable) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_datasets(f"imagefolder:{tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="expected class folders"):
        build_datasets(f"imagefolder:{tmp_path}")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        build_datasets(f"imagefolder:{tmp_path}")
    make_image_tree(tmp_path, ["full"], 2)
    with pytest.raises(FileNotFoundError, match=r"without images.*empty_class"):
        build_datasets(f"imagefolder:{tmp_path}")
    with pytest.raises(ValueError, match="needs a path"):
        build_datasets("imagefolder:")


def test_a_val_folder_without_train_is_refused(
    tmp_path: Path, make_image_tree: Callable
) -> None:
    """``root/val/<class>/…`` with no ``root/train/`` was read as a class tree whose only class
    is ``val``: every image labelled 0, silently."""
    make_image_tree(tmp_path / "val", ["a", "b"], 3)
    with pytest.raises(FileNotFoundError, match=r"there is no train/ folder"):
        build_datasets(f"imagefolder:{tmp_path}")


def test_synthetic_noise_must_be_finite() -> None:
    """``noise=inf`` was accepted: every pixel saturates (or is NaN where ε is 0)."""
    for bad in ("inf", "nan", "-1"):
        with pytest.raises(ValueError, match="noise must be finite and >= 0"):
            build_datasets(f"synthetic:noise={bad}")


def test_synthetic_is_deterministic_and_learnable() -> None:
    spec = "synthetic:num_classes=4,size=8,channels=2,n=200,n_val=80"
    a, a2, other = (build_datasets(spec, seed=s) for s in (7, 7, 8))
    assert (a.num_classes, a.in_chans, a.image_size, len(a.train), len(a.val)) == (4, 2, 8, 200, 80)
    xa = torch.stack([a.train[i][0] for i in range(200)])
    xa2 = torch.stack([a2.train[i][0] for i in range(200)])
    assert torch.equal(xa, xa2) and torch.equal(a.val.labels, a2.val.labels)
    assert not torch.equal(xa, torch.stack([other.train[i][0] for i in range(200)]))
    assert np.bincount(a.train.labels.numpy()).tolist() == [50] * 4
    assert abs(float(xa.mean())) < 0.05 and abs(float(xa.std()) - 1) < 0.05
    # nearest class mean (fitted on train) classifies held-out examples well
    ya = a.train.labels
    centroids = torch.stack([xa[ya == c].mean(0) for c in range(4)]).flatten(1)
    xv = torch.stack([a.val[i][0] for i in range(80)]).flatten(1)
    pred = torch.cdist(xv, centroids).argmin(1)
    assert float((pred == a.val.labels).float().mean()) > 0.9


def test_synthetic_defaults_and_spec_errors() -> None:
    b = build_datasets("synthetic")
    assert (b.num_classes, b.in_chans, b.image_size, len(b.train), len(b.val)) == (
        10,
        3,
        32,
        512,
        102,  # round(512 * 0.2)
    )
    assert b.train[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown synthetic option 'classes'"):
        build_datasets("synthetic:classes=3")
    with pytest.raises(ValueError, match=r"size=.*not a valid int"):
        build_datasets("synthetic:size=big")
    with pytest.raises(ValueError, match=r"num_classes must be an int in \[2, 65536\]"):
        build_datasets("synthetic:num_classes=1")
    with pytest.raises(ValueError, match=r"synthetic n must be an int in \[1, 134217728\]"):
        build_datasets("synthetic:n=1000000000000")  # 8 TB of labels, refused before any
    with pytest.raises(ValueError, match="key=value"):
        build_datasets("synthetic:n")


def test_decoding_limits_and_odd_images(tmp_path: Path, make_image_tree: Callable) -> None:
    """A decompression bomb is an ``UnreadableImageError`` (skipped with ``skip_unreadable``);
    an index out of range raises ``IndexError`` with ``skip_unreadable`` too (it used to wrap
    around, so iteration never ended); a 16-bit grey PNG is scaled to 8 bits (Pillow's
    ``convert`` clipped it, nearly all white); a float image is refused."""
    from normfree.data.augment import Compose
    from normfree.data.imagefolder import ImageFolderDataset, UnreadableImageError

    make_image_tree(tmp_path, ["a"], 2)
    files = sorted((tmp_path / "a").iterdir())
    Image.new("L", (20_000, 10_000)).save(files[0])  # 2e8 pixels, over Pillow's bomb limit
    labels = torch.tensor([0, 0])
    with pytest.raises(UnreadableImageError, match="MAX_IMAGE_PIXELS"):
        ImageFolderDataset(files, labels, Compose([]))[0]
    lenient = ImageFolderDataset(files, labels, Compose([]), skip_unreadable=True)
    assert lenient[0][0].shape == (3, 30, 40)  # the next readable file stands in
    assert lenient[-1][0].shape == (3, 30, 40)
    with pytest.raises(IndexError, match="out of range"):
        lenient[2]
    assert len(list(lenient)) == 2

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(files[0])
    assert Image.open(files[0]).mode == "I;16"
    x = ImageFolderDataset(files, labels, Compose([])).raw(0)
    want = np.rint(ramp * (255 / 65535)).astype(np.uint8)
    assert x.dtype == torch.uint8 and all(np.array_equal(c, want) for c in x.numpy())
    Image.fromarray(ramp.astype(np.float32)).save(files[0].with_suffix(".tif"))
    with pytest.raises(UnreadableImageError, match="floating-point image"):
        ImageFolderDataset([files[0].with_suffix(".tif")], labels[:1], Compose([])).raw(0)


def test_linked_sub_folders_are_followed(tmp_path: Path, make_image_tree: Callable) -> None:
    """Images in a symlinked folder inside a class folder count, as in torchvision's
    ``make_dataset`` (``rglob`` did not follow the link)."""
    make_image_tree(tmp_path / "tree", ["a", "b"], 2)
    make_image_tree(tmp_path / "elsewhere", ["more"], 3)
    (tmp_path / "tree" / "a" / "linked").symlink_to(tmp_path / "elsewhere" / "more")
    files, labels, classes = scan_image_folder(tmp_path / "tree")
    assert classes == ["a", "b"] and np.bincount(labels.numpy()).tolist() == [5, 2]
    assert sum("linked" in f.parts for f in files) == 3
    (tmp_path / "tree" / "b" / "loop").symlink_to(tmp_path / "tree" / "b")  # a cycle: once
    files, labels, _ = scan_image_folder(tmp_path / "tree")
    assert np.bincount(labels.numpy()).tolist() == [5, 2]
