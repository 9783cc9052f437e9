"""CIFAR archives: locations (dir / parent / tar.gz), exact contents, malformed-data errors and
the restricted unpickler."""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from normfree.data import build_datasets, safe_pickle_load
from normfree.data.cifar import CIFAR_MEAN_STD


def _load_raw(d: Path, names: list[str], key: bytes) -> tuple[np.ndarray, np.ndarray]:
    parts = [pickle.loads((d / n).read_bytes(), encoding="bytes") for n in names]
    data = np.concatenate([p[b"data"] for p in parts])
    labels = np.concatenate([np.asarray(p[key]) for p in parts])
    return data.reshape(-1, 3, 32, 32), labels


def test_cifar10_contents_and_normalisation(cifar10_dir: Path) -> None:
    b = build_datasets(f"cifar10:{cifar10_dir}")
    assert (b.num_classes, b.in_chans, b.image_size, b.test_size) == (10, 3, 32, 32)
    assert (len(b.train), len(b.val), b.name) == (30, 8, "cifar10")
    assert b.classes == [f"class{i}" for i in range(10)]
    names = [f"data_batch_{i}" for i in range(1, 6)]
    data, labels = _load_raw(cifar10_dir, names, b"labels")
    assert torch.equal(b.train.images, torch.from_numpy(data))
    assert torch.equal(b.train.labels, torch.from_numpy(labels))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in CIFAR_MEAN_STD["cifar10"])
    x, y = b.train[7]
    expected = (torch.from_numpy(data[7]).float() / 255 - mean) / std
    assert x.dtype == torch.float32 and y == int(labels[7])
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    tdata, tlabels = _load_raw(cifar10_dir, ["test_batch"], b"labels")
    assert torch.equal(b.val.images, torch.from_numpy(tdata))
    assert [b.val[i][1] for i in range(8)] == tlabels.tolist()


def test_cifar10_dir_parent_and_tar_give_identical_tensors(
    cifar10_dir: Path, tmp_path: Path, write_tar: Callable
) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_tar(cifar10_dir, archive)
    holder = tmp_path / "holder"
    holder.mkdir()
    shutil.copy(archive, holder / archive.name)
    bundles = [
        build_datasets(f"cifar10:{p}") for p in (cifar10_dir, cifar10_dir.parent, archive, holder)
    ]
    for other in bundles[1:]:
        assert torch.equal(other.train.images, bundles[0].train.images)
        assert torch.equal(other.train.labels, bundles[0].train.labels)
        assert torch.equal(other.val.images, bundles[0].val.images)
        assert torch.equal(other.val.labels, bundles[0].val.labels)
        assert other.classes == bundles[0].classes
    assert not (tmp_path / "cifar-10-batches-py").exists()  # the archive was never extracted


def test_cifar100(cifar100_dir: Path, tmp_path: Path, write_tar: Callable) -> None:
    b = build_datasets(f"cifar100:{cifar100_dir.parent}", image_size=40, test_size=48)
    assert (b.num_classes, len(b.train), len(b.val)) == (100, 12, 5)
    assert b.classes[:2] == ["fine0", "fine1"]
    assert b.train[0][0].shape == (3, 40, 40) and b.val[0][0].shape == (3, 48, 48)
    data, labels = _load_raw(cifar100_dir, ["train"], b"fine_labels")
    assert torch.equal(b.train.labels, torch.from_numpy(labels))
    archive = tmp_path / "cifar-100-python.tar.gz"
    write_tar(cifar100_dir, archive)
    assert torch.equal(build_datasets(f"cifar100:{archive}").train.images, torch.from_numpy(data))


def test_missing_locations_and_files(
    cifar10_dir: Path, tmp_path: Path, write_tar: Callable
) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_datasets(f"cifar10:{tmp_path / 'nowhere'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="found neither cifar-10-batches-py"):
        build_datasets(f"cifar10:{empty}")
    (cifar10_dir / "data_batch_3").unlink()
    msg = f"expected CIFAR-10 python archive at {cifar10_dir}: missing data_batch_3"
    with pytest.raises(FileNotFoundError, match=msg):
        build_datasets(f"cifar10:{cifar10_dir.parent}")
    archive = tmp_path / "broken.tar.gz"
    write_tar(cifar10_dir, archive)
    with pytest.raises(FileNotFoundError, match="missing cifar-10-batches-py/data_batch_3"):
        build_datasets(f"cifar10:{archive}")
    with pytest.raises(ValueError, match="needs a path"):
        build_datasets("cifar10")
    not_tar = tmp_path / "x.bin"
    not_tar.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a directory or a tar archive"):
        build_datasets(f"cifar10:{not_tar}")


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, r"uint8 \(N, 3072\)"),
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "float32"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, r"expected \(4,\)"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, r"\[0, 10\)"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [2**70]}, "list of integers"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1.7]}, r"integers \(found float"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [True]}, r"integers \(found bool"),
        ({b"labels": [0] * 4}, "missing key b'data'"),
        ([1, 2, 3], "expected a pickled dict"),
    ],
)
def test_malformed_batch(
    cifar10_dir: Path, batch: object, match: str, py2_pickle: Callable
) -> None:
    (cifar10_dir / "data_batch_2").write_bytes(py2_pickle(batch))
    with pytest.raises(ValueError, match=match) as info:
        build_datasets(f"cifar10:{cifar10_dir}")
    assert "data_batch_2" in str(info.value)


def test_not_a_pickle(cifar10_dir: Path) -> None:
    (cifar10_dir / "test_batch").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="test_batch: not a valid CIFAR pickle"):
        build_datasets(f"cifar10:{cifar10_dir}")


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.target}",))


def test_restricted_unpickler_refuses_arbitrary_globals(
    cifar10_dir: Path, tmp_path: Path, py2_pickle: Callable
) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (posix|os)\.system"):
        safe_pickle_load(payload)
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        safe_pickle_load(pickle.dumps(eval, protocol=4))
    (cifar10_dir / "data_batch_1").write_bytes(payload)
    with pytest.raises(ValueError, match="refusing to load global"):
        build_datasets(f"cifar10:{cifar10_dir}")
    assert not marker.exists()
    # the numpy globals the real archives need still load, in both spellings
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for blob in (py2_pickle(arr), pickle.dumps(arr, protocol=2), pickle.dumps(arr)):
        assert np.array_equal(safe_pickle_load(blob), arr)


def test_tar_member_outside_expected_dir_is_ignored(cifar10_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "odd.tar"
    with tarfile.open(archive, "w") as tar:
        for f in sorted(cifar10_dir.iterdir()):
            tar.add(f, arcname=f"other-dir/{f.name}")
    with pytest.raises(FileNotFoundError, match="missing cifar-10-batches-py/data_batch_1"):
        build_datasets(f"cifar10:{archive}")


def test_an_archive_member_larger_than_any_cifar_file_is_refused_unread(tmp_path: Path) -> None:
    """A small archive can declare (or inflate to) any size: a member bigger than the largest
    CIFAR file is refused from its header, before anything is read."""
    member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    member.size = 3 << 30  # 3 GiB declared; the archive holds only the header
    archive = tmp_path / "cifar-10-python.tar"
    archive.write_bytes(member.tobuf())
    with pytest.raises(ValueError, match=r"data_batch_1 holds 3072 MiB, more than any CIFAR-10"):
        build_datasets(f"cifar10:{archive}")


class _Inflated:
    """An array that ``numpy.ndarray`` builds from an 8-byte buffer with zero strides: a few
    hundred bytes of pickle stand for any number of images."""

    def __init__(self, shape: tuple[int, ...], dtype: str) -> None:
        self.shape, self.dtype = shape, dtype

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        strides = (0,) * len(self.shape)
        return (np.ndarray, (self.shape, np.dtype(self.dtype), b"\0" * 8, 0, strides))


def test_an_array_not_held_by_the_file_s_bytes_is_refused(cifar10_dir: Path) -> None:
    """Only allowed globals, yet 50,000 images from a 281-byte file (its copy used to take
    2 GB, and more images the whole memory): refused before any copy."""
    blob = pickle.dumps({b"data": _Inflated((50_000, 3072), "u1"),
                         b"labels": _Inflated((50_000,), "i8")}, protocol=2)  # fmt: skip
    assert len(blob) < 400
    (cifar10_dir / "data_batch_3").write_bytes(blob)
    with pytest.raises(ValueError, match=r"data_batch_3: b'data' \(50000 images\) is not stored"):
        build_datasets(f"cifar10:{cifar10_dir}")


def test_protocol_5_pickles_load(cifar10_dir: Path) -> None:
    """numpy pickles arrays at protocol 5 with ``numpy._core.numeric._frombuffer``: allowed,
    and the archive re-pickled so reads the same tensors."""
    before = build_datasets(f"cifar10:{cifar10_dir}")
    for f in cifar10_dir.iterdir():
        obj = pickle.loads(f.read_bytes(), encoding="bytes")
        f.write_bytes(pickle.dumps(obj, protocol=5))
    assert b"_frombuffer" in (cifar10_dir / "test_batch").read_bytes()
    after = build_datasets(f"cifar10:{cifar10_dir}")
    assert torch.equal(after.train.images, before.train.images)
    assert torch.equal(after.val.labels, before.val.labels)


def test_a_corrupt_gzip_stream_is_a_one_line_error(cifar10_dir: Path, tmp_path: Path) -> None:
    """Flipping bytes inside the deflate stream of the .tar.gz: each gives the archive's
    ``ValueError`` (a ``zlib.error`` used to escape as a traceback). The archive is built
    byte for byte the same on every run (no time stamps), so the same places are flipped."""
    import gzip
    import io

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for f in sorted(cifar10_dir.iterdir()):
            info = tarfile.TarInfo(f"{cifar10_dir.name}/{f.name}")
            info.size, info.mtime = f.stat().st_size, 0
            tar.addfile(info, io.BytesIO(f.read_bytes()))
    good = gzip.compress(raw.getvalue(), mtime=0)
    bad = tmp_path / "cifar-10-python.tar.gz"
    zlib_errors = 0
    for pos in range(40, len(good) - 20, len(good) // 50):  # 50 places along the stream
        flipped = bytearray(good)
        flipped[pos] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        try:
            build_datasets(f"cifar10:{bad}")
        except (ValueError, FileNotFoundError) as e:  # anything else fails the test
            zlib_errors += "decompressing" in str(e)
    assert zlib_errors > 0  # (the case that used to escape is among them)
