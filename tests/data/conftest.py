"""Fixtures: tiny CIFAR archives in the real pickle format and tiny image-folder trees."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest


def py2_style_pickle(obj: object) -> bytes:
    """Protocol-2 pickle spelling numpy's reconstructor as the original (numpy 1 / Python 2
    era) archives do: ``numpy.core.multiarray._reconstruct``."""
    blob = pickle.dumps(obj, protocol=2)
    return blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def cifar_batch(
    rng: np.random.Generator, n: int, num_classes: int, label_key: bytes
) -> dict[bytes, object]:
    return {
        b"batch_label": b"training batch",
        label_key: [int(v) for v in rng.integers(0, num_classes, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_tar(directory: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted(directory.iterdir()):
            tar.add(f, arcname=f"{directory.name}/{f.name}")


@pytest.fixture(name="py2_pickle")
def py2_pickle_fixture() -> Callable[[object], bytes]:
    return py2_style_pickle


@pytest.fixture(name="write_tar")
def write_tar_fixture() -> Callable[[Path, Path], None]:
    return write_tar


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    """``tmp/parent/cifar-10-batches-py`` with 5×6 train and 8 test images."""
    rng = np.random.default_rng(0)
    d = tmp_path / "parent" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(py2_style_pickle(cifar_batch(rng, 6, 10, b"labels")))
    (d / "test_batch").write_bytes(py2_style_pickle(cifar_batch(rng, 8, 10, b"labels")))
    meta = {
        b"label_names": [f"class{i}".encode() for i in range(10)],
        b"num_cases_per_batch": 6,
        b"num_vis": 3072,
    }
    (d / "batches.meta").write_bytes(py2_style_pickle(meta))
    return d


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    d = tmp_path / "c100" / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n in (("train", 12), ("test", 5)):
        batch = cifar_batch(rng, n, 100, b"fine_labels")
        batch[b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, n)]
        (d / name).write_bytes(pickle.dumps(batch, protocol=4))
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    (d / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    return d


@pytest.fixture
def make_image_tree() -> Callable[..., None]:
    """``make(root, classes, per_class, size=(h, w))``: PNGs with a class-dependent colour."""
    from PIL import Image

    def make(root: Path, classes: list[str], per_class: int, size: tuple[int, int] = (30, 40)):
        rng = np.random.default_rng(len(classes) * 31 + per_class)
        for c, name in enumerate(classes):
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                arr[..., c % 3] = 255
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                (folder / f"{name}_{i}.png").write_bytes(buf.getvalue())

    return make
