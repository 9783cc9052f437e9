"""ImageNet-style class-folder trees: ``root/<class>/<image>`` or ``root/{train,val}/<class>/…``.

Class indices follow the sorted class-folder names of the training tree (as torchvision's
``ImageFolder``); files are decoded with Pillow to RGB ``uint8`` tensors in ``__getitem__``.
A file that cannot be decoded raises :class:`UnreadableImageError` naming it, or — with
``skip_unreadable`` — is replaced by the next readable file (with its label) and logged once.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


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
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise UnreadableImageError(
                f"cannot decode image {path} ({exc}); remove or replace the file, or set "
                "data.skip_unreadable=true to skip unreadable files"
            ) from exc
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not self.skip_unreadable:
            return super().__getitem__(index)
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
