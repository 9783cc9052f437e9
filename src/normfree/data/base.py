"""Dataset building blocks shared by every source: the :class:`DataBundle` returned by
``build_datasets``, a transformed image dataset base class, stratified splits and the standard
train / eval transform pipelines."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

from normfree.data.augment import (
    AugmentConfig,
    CenterCrop,
    Compose,
    Normalize,
    RandAugmentUint8,
    Resize,
    ResizeShortSide,
    crop_flip_transforms,
)

__all__ = [
    "DataBundle",
    "ImageDataset",
    "TensorImageDataset",
    "build_transform",
    "stratified_split",
]


@dataclass
class DataBundle:
    """Train and held-out datasets plus what a model needs to know about them.

    Items of both datasets are ``(image, label)``: a normalised ``float32`` ``(C, H, W)`` tensor
    and an ``int``. ``train`` applies the requested augmentation, ``val`` is deterministic.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    test_size: int
    name: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: list[str] | None = field(default=None, repr=False)


class ImageDataset(Dataset):
    """``(transform(raw image), label)`` items; subclasses implement :meth:`raw` and ``__len__``.

    ``labels`` is a ``(N,)`` int64 tensor of every item's label (no decoding needed)."""

    labels: Tensor

    def __init__(self, transform: Compose) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return int(self.labels.numel())

    def raw(self, index: int) -> Tensor:
        """The untransformed image of item ``index`` (``uint8`` or float in [0, 1])."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return self.transform(self.raw(index)), int(self.labels[index])


class TensorImageDataset(ImageDataset):
    """Images held in memory as one ``(N, C, H, W)`` tensor (``uint8``, or float in [0, 1])."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Compose) -> None:
        super().__init__(transform)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.ndim != 1 or labels.numel() != images.shape[0]:
            raise ValueError(
                f"labels must be ({images.shape[0]},) to match the images, got "
                f"{tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to(torch.int64)

    def raw(self, index: int) -> Tensor:
        return self.images[index]


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Held-out split with ``round(val_fraction · n_c)`` examples of every class ``c``.

    Each class's members are permuted by one ``torch.Generator`` seeded with ``seed`` (classes
    in increasing order); returns sorted ``(train_idx, val_idx)``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(int(seed))
    train, val = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        n_val = int(val_fraction * members.numel() + 0.5)
        perm = members[torch.randperm(members.numel(), generator=g)]
        val.append(perm[:n_val])
        train.append(perm[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def build_transform(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: AugmentConfig | None = None,
    *,
    resize_crop_32: bool = False,
) -> Compose:
    """The per-example pipeline: geometry → flip → RandAugment → normalise.

    Geometry: ``"random_resized"`` crops to ``size`` directly; otherwise the deterministic base
    step (square resize to ``size`` for in-memory datasets; ``resize_crop_32`` — short side to
    ``size + 32`` then centre crop, the official NFNet eval — for image folders), followed by the
    ``"pad"`` crop when requested. ``augment=None`` gives the deterministic eval pipeline.
    """
    aug = augment or AugmentConfig()
    mode = "bicubic" if resize_crop_32 else "bilinear"
    crop, flip = crop_flip_transforms(size, aug, mode)
    steps: list[object] = []
    if aug.crop != "random_resized":  # the Inception crop resizes to `size` itself
        if resize_crop_32:
            steps += [ResizeShortSide(size + 32, mode=mode), CenterCrop(size)]
        else:
            steps.append(Resize(size, mode=mode))
    steps += crop + flip
    if aug.randaugment is not None:
        steps.append(RandAugmentUint8(*aug.randaugment))
    steps.append(Normalize(mean, std))
    return Compose(steps)
