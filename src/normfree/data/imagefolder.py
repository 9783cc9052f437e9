"""ImageNet-style class-folder trees: ``root/<class>/<image>`` or ``root/{train,val}/<class>/…``.

Class indices follow the sorted class-folder names of the training tree (as torchvision's
``ImageFolder``); files are decoded with Pillow to RGB ``uint8`` tensors in ``__getitem__``.
A file that cannot be decoded raises :class:`UnreadableImageError` naming it, or — with
``skip_unreadable`` — is replaced by the next readable file (with its label) and logged once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from normfree.data._optional import require_pil
from normfree.data.augment import Compose
from normfree.data.base import ImageDataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "UnreadableImageError", "scan_image_folder"]

log = logging.getLogger("normfree.data")


class UnreadableImageError(ValueError):
    """An image file of the dataset cannot be decoded (the message names the file)."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _images_in(folder: Path) -> list[Path]:
    """The image files under ``folder``, sorted, following linked sub-folders (as
    torchvision's ``make_dataset``: ``os.walk(followlinks=True)``), each real folder once (a
    link back up the tree would otherwise be walked for ever)."""
    found = []
    seen = {os.path.realpath(folder)}
    for parent, dirs, names in os.walk(folder, followlinks=True):
        real = [(d, os.path.realpath(os.path.join(parent, d))) for d in dirs]
        dirs[:] = [d for d, r in real if r not in seen]
        seen.update(r for _, r in real)
        found += [Path(parent, n) for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p for p in found if p.is_file())


def _to_rgb(im: Any) -> np.ndarray:
    """A decoded Pillow image as RGB ``uint8`` ``(H, W, 3)``. 16-bit grey images (PNG, TIFF:
    Pillow's ``I;16*`` modes, and ``I`` holding them) are scaled by 255/65535 first; Pillow's own
    ``convert("RGB")`` clips them at 255, which turns nearly every pixel white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        grey = np.asarray(im, dtype=np.float64) * (255 / 65535)
        return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode == "F":
        raise ValueError(
            "a floating-point image (Pillow mode F) has no fixed range to map to 8 bits; "
            "convert it to an 8- or 16-bit image"
        )
    return np.asarray(im.convert("RGB"))


def scan_image_folder(
    root: Path, classes: list[str] | None = None
) -> tuple[list[Path], Tensor, list[str]]:
    """``(files, labels, classes)`` of ``root/<class>/**/<image>``.

    With ``classes=None`` the class list is the sorted sub-folder names and every class must hold
    at least one image; with a given list (a validation tree) each sub-folder must be one of them.
    """
    if not root.is_dir():
        raise FileNotFoundError(
            f"expected an image-folder tree at {root} (root/<class>/<image>): not a directory"
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(
            f"expected class folders under {root} (root/<class>/<image>{IMAGE_EXTENSIONS[0]}), "
            "found none"
        )
    is_train_tree = classes is None
    if classes is None:
        classes = [p.name for p in folders]
    index = {c: i for i, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    for folder in folders:
        if folder.name not in index:
            raise ValueError(
                f"class folder {folder} is not a class of the training tree "
                f"({len(classes)} classes: {classes[:5]}{'…' if len(classes) > 5 else ''})"
            )
        found = _images_in(folder)
        if not found:
            empty.append(folder.name)
        files += found
        labels += [index[folder.name]] * len(found)
    if not files:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under the class folders of {root}"
        )
    if empty and is_train_tree:
        raise FileNotFoundError(
            f"class folders without images under {root}: {', '.join(empty[:10])}"
        )
    return files, torch.tensor(labels, dtype=torch.int64), classes


class ImageFolderDataset(ImageDataset):
    """Images decoded from ``files`` with Pillow (RGB, ``uint8`` ``(3, H, W)``)."""

    def __init__(
        self, files: list[Path], labels: Tensor, transform: Compose, skip_unreadable: bool = False
    ) -> None:
        super().__init__(transform)
        self.skip_unreadable = skip_unreadable
        self.unreadable: set[str] = set()  # files this process failed to decode
        if len(files) != labels.numel():
            raise ValueError(f"{len(files)} files but {labels.numel()} labels")
        self.files = [str(f) for f in files]
        self.labels = labels.to(torch.int64)
        require_pil("imagefolder datasets")

    def raw(self, index: int) -> Tensor:
        image_mod = require_pil("imagefolder datasets")
        path = self.files[index]
        try:
            with image_mod.open(path) as im:
                arr = _to_rgb(im)
        except (OSError, ValueError, image_mod.DecompressionBombError) as exc:
            bomb = isinstance(exc, image_mod.DecompressionBombError)
            raise UnreadableImageError(
                f"cannot decode image {path} ({exc}); remove or replace the file, "
                + ("raise PIL.Image.MAX_IMAGE_PIXELS if it is a real image, " if bomb else "")
                + "or set data.skip_unreadable=true to skip unreadable files"
            ) from exc
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not self.skip_unreadable or not -len(self) <= index < len(self):
            return super().__getitem__(index)  # (an index out of range: its IndexError)
        index %= len(self)
        for k in range(len(self)):  # the next readable file stands in for an unreadable one
            i = (index + k) % len(self)
            if self.files[i] in self.unreadable:
                continue
            try:
                return super().__getitem__(i)
            except UnreadableImageError as e:
                self.unreadable.add(self.files[i])
                log.warning(
                    "skipping unreadable image %s (%s); %d unreadable file(s) skipped so far",
                    self.files[i], e.__cause__, len(self.unreadable),
                )  # fmt: skip
        raise UnreadableImageError(f"no image of the dataset can be decoded ({self.files[0]}, …)")
