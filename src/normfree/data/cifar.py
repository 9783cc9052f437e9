"""CIFAR-10 / CIFAR-100 from the standard python-pickle archives already on disk (Krizhevsky 2009).

Accepted locations (nothing is downloaded): the batches directory itself
(``cifar-10-batches-py/`` or ``cifar-100-python/``), its parent, the ``.tar.gz`` archive (read with
:mod:`tarfile` in memory, never extracted), or a directory holding that archive.

The files are pickles (Python 2 era, read with ``encoding="bytes"``) of dicts of numpy arrays,
lists and bytes. :class:`RestrictedUnpickler` resolves only the globals such a pickle needs:
``numpy.core.multiarray._reconstruct`` (also spelled ``numpy._core.multiarray`` by numpy ≥ 2),
``numpy.ndarray`` and ``numpy.dtype`` to rebuild the arrays, ``numpy._core.numeric._frombuffer``
for arrays pickled at protocol 5, and ``_codecs.encode``, which Python 3 writes for ``bytes`` at
protocol ≤ 2 (archives re-pickled by Python 3). Any other global (``os.system``,
``builtins.eval``, …) is refused, so a tampered archive cannot run code. An array must also be
held by the file's own bytes (C-contiguous, no larger than the file): ``numpy.ndarray`` can build
a zero-stride or uninitialised array of any size from a few bytes, which a copy would then
inflate until memory runs out.
"""

from __future__ import annotations

import codecs
import importlib
import io
import lzma
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CIFAR_MEAN_STD",
    "RestrictedUnpickler",
    "load_cifar_arrays",
    "safe_pickle_load",
]

CIFAR_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct as fn  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


def _frombuffer() -> Any:
    try:
        numeric = importlib.import_module("numpy._core.numeric")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        numeric = importlib.import_module("numpy.core.numeric")
    return numeric._frombuffer


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # arrays pickled at protocol 5
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy/codecs globals of a CIFAR archive."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR archive only needs "
                f"{sorted(f'{m}.{n}' for m, n in _ALLOWED_GLOBALS)}"
            )
        return resolve()


def safe_pickle_load(data: bytes | io.BufferedIOBase) -> Any:
    """Unpickle ``data`` (bytes or a binary file) with :class:`RestrictedUnpickler` and
    ``encoding="bytes"``."""
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    return RestrictedUnpickler(f, encoding="bytes").load()


@dataclass(frozen=True)
class _Layout:
    title: str
    dirname: str
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)


_LAYOUTS = {
    "cifar10": _Layout(
        "CIFAR-10",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        b"labels",
        b"label_names",
        10,
    ),
    "cifar100": _Layout(
        "CIFAR-100",
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ("train",),
        ("test",),
        "meta",
        b"fine_labels",
        b"fine_label_names",
        100,
    ),
}


# the largest file of the python archives is CIFAR-100's train (~158 MB); a bigger member is
# not CIFAR (and a small archive could inflate to any size: it is refused before it is read)
_LARGEST_MEMBER = 256 << 20


def _too_large(lay: _Layout, where: object, name: str, size: int) -> ValueError:
    return ValueError(
        f"expected {lay.title} python archive at {where}: {name} holds {size / 2**20:.0f} MiB, "
        f"more than any {lay.title} file ({_LARGEST_MEMBER >> 20} MiB at most)"
    )


def _read_dir(root: Path, lay: _Layout) -> dict[str, bytes]:
    missing = [f for f in lay.files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"expected {lay.title} python archive at {root}: missing {', '.join(missing)}"
        )
    for f in lay.files:
        if (size := (root / f).stat().st_size) > _LARGEST_MEMBER:
            raise _too_large(lay, root, f, size)
    return {f: (root / f).read_bytes() for f in lay.files}


def _read_tar(path: Path, lay: _Layout) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # one sequential pass: cheap on a gzip stream
                p = PurePosixPath(member.name)
                if not member.isfile() or p.name not in lay.files or p.name in out:
                    continue
                if len(p.parts) > 1 and p.parent.name != lay.dirname:
                    continue
                if member.size > _LARGEST_MEMBER:
                    raise _too_large(lay, path, member.name, member.size)
                f = tar.extractfile(member)
                if f is not None:
                    out[p.name] = f.read(_LARGEST_MEMBER + 1)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise ValueError(f"expected {lay.title} python archive at {path}: {exc}") from exc
    missing = [f for f in lay.files if f not in out]
    if missing:
        raise FileNotFoundError(
            f"expected {lay.title} python archive at {path}: missing "
            + ", ".join(f"{lay.dirname}/{f}" for f in missing)
        )
    return out


def _read_files(path: Path, lay: _Layout) -> tuple[dict[str, bytes], Path]:
    if not path.exists():
        raise FileNotFoundError(
            f"expected {lay.title} python archive at {path}: no such file or directory "
            f"(give the {lay.dirname}/ directory, its parent, or {lay.archive})"
        )
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise ValueError(
                f"expected {lay.title} python archive at {path}: not a directory or a tar archive"
            )
        return _read_tar(path, lay), path
    if any((path / f).exists() for f in lay.files):
        return _read_dir(path, lay), path
    if (path / lay.dirname).is_dir():
        return _read_dir(path / lay.dirname, lay), path / lay.dirname
    if (path / lay.archive).is_file():
        return _read_tar(path / lay.archive, lay), path / lay.archive
    raise FileNotFoundError(
        f"expected {lay.title} python archive at {path}: found neither {lay.dirname}/, "
        f"{lay.archive}, nor the files {', '.join(lay.files)}"
    )


def _get(obj: dict, key: bytes, where: str) -> Any:
    for k in (key, key.decode()):
        if k in obj:
            return obj[k]
    raise ValueError(f"{where}: missing key {key!r} (keys: {sorted(map(repr, obj))})")


def _load(blob: bytes, where: str) -> dict:
    try:
        obj = safe_pickle_load(blob)
    except Exception as exc:
        raise ValueError(f"{where}: not a valid CIFAR pickle: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _parse_batch(blob: bytes, where: str, lay: _Layout) -> tuple[Tensor, Tensor]:
    obj = _load(blob, where)
    data = np.asarray(_get(obj, b"data", where))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{where}: b'data' is {data.dtype} with shape {data.shape}, expected uint8 (N, 3072) "
            "(32x32 RGB, channel-major)"
        )
    if not data.flags.c_contiguous or data.nbytes > len(blob):
        raise ValueError(
            f"{where}: b'data' ({data.shape[0]} images) is not stored in the file's "
            f"{len(blob)} bytes: not a CIFAR batch"
        )
    try:
        labels = np.asarray(_get(obj, lay.label_key, where))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{where}: {lay.label_key!r} is not a list of integers") from exc
    if labels.size and not np.issubdtype(labels.dtype, np.integer):  # (floats, bools, objects)
        raise ValueError(
            f"{where}: {lay.label_key!r} is not a list of integers (found {labels.dtype})"
        )
    if labels.shape != (data.shape[0],):  # (before any copy: its size is now bounded)
        raise ValueError(
            f"{where}: {lay.label_key!r} has shape {labels.shape}, expected ({data.shape[0]},)"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= lay.num_classes):
        raise ValueError(
            f"{where}: labels must lie in [0, {lay.num_classes}), got "
            f"[{labels.min()}, {labels.max()}]"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def load_cifar_arrays(
    kind: str, path: str | Path
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[str]]:
    """``((train_images, train_labels), (test_images, test_labels), class_names)`` with
    ``uint8`` ``(N, 3, 32, 32)`` images; ``kind`` is ``"cifar10"`` or ``"cifar100"``."""
    if kind not in _LAYOUTS:
        raise ValueError(f"unknown CIFAR kind {kind!r}; expected one of {sorted(_LAYOUTS)}")
    lay = _LAYOUTS[kind]
    files, root = _read_files(Path(path).expanduser(), lay)

    def split(names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        parts = [_parse_batch(files[n], f"{lay.title} file {root}/{n}", lay) for n in names]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    train, test = split(lay.train), split(lay.test)
    where = f"{lay.title} file {root}/{lay.meta}"
    names = _get(_load(files[lay.meta], where), lay.names_key, where)
    if not isinstance(names, (list, tuple)) or len(names) != lay.num_classes:
        raise ValueError(f"{where}: {lay.names_key!r} must list {lay.num_classes} class names")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return train, test, classes
