"""``build_datasets(spec)``: the datasets of a run from a one-line spec. Nothing is downloaded.

=====================================  =========================================================
``digits``                             scikit-learn's bundled 8×8 digits, stratified held-out split
``hard-digits[:size=8]``               the same digits (resized) and distorted once (harder)
``cifar10:/path``, ``cifar100:/path``  python-pickle archives on disk; the official test set is val
``imagefolder:/path``                  ``path/{train,val}/<class>/<img>`` or ``path/<class>/<img>``
``synthetic[:k=v,…]``                  deterministic random images with a class signal
=====================================  =========================================================
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from normfree.data.augment import AugmentConfig, Compose
from normfree.data.base import DataBundle, TensorImageDataset, build_transform, stratified_split

__all__ = ["DATASET_KINDS", "IMAGENET_MEAN_STD", "build_datasets", "default_augment"]

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASET_KINDS = ("digits", "hard-digits", "cifar10", "cifar100", "imagefolder", "synthetic")
_SPEC_HELP = (
    "digits | hard-digits[:size=8] | cifar10:/dir | cifar100:/dir | imagefolder:/dir | "
    "synthetic[:num_classes=10,size=32,channels=3,n=512]"
)


def _check_size(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.double() / (255.0 if images.dtype == torch.uint8 else 1.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def _check_randaugment_channels(augment: AugmentConfig | None, channels: int, spec: str) -> None:
    if augment is not None and augment.randaugment is not None and channels not in (1, 3):
        raise ValueError(f"RandAugment needs 1- or 3-channel images; {spec!r} has {channels}")


def default_augment(spec: str) -> AugmentConfig:
    """The standard training augmentation of a dataset kind: CIFAR pad-4 crop + flip, image
    folders Inception crop + flip, none for digits and synthetic data."""
    kind = spec.partition(":")[0].strip().lower()
    if kind in ("cifar10", "cifar100"):
        return AugmentConfig(crop="pad", pad=4, flip=True)
    if kind == "imagefolder":
        return AugmentConfig(crop="random_resized", flip=True)
    if kind in ("digits", "hard-digits", "synthetic"):
        return AugmentConfig()
    raise ValueError(f"unknown dataset spec {spec!r}; expected {_SPEC_HELP}")


def _tensor_bundle(
    name: str,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    num_classes: int,
    image_size: int | None,
    test_size: int | None,
    augment: AugmentConfig | None,
    classes: list[str] | None = None,
) -> DataBundle:
    size = image_size or int(train[0].shape[-1])
    test = test_size or size
    mean, std = stats
    return DataBundle(
        train=TensorImageDataset(*train, build_transform(size, mean, std, augment)),
        val=TensorImageDataset(*val, build_transform(test, mean, std)),
        num_classes=num_classes,
        in_chans=int(train[0].shape[1]),
        image_size=size,
        test_size=test,
        name=name,
        mean=mean,
        std=std,
        classes=classes,
    )


def _digits(
    arg: str,
    size: int | None,
    test: int | None,
    aug: AugmentConfig | None,
    seed: int,
    val_fraction: float,
) -> DataBundle:
    from normfree.data.digits import load_digits_arrays

    if arg:
        raise ValueError(f"the 'digits' dataset takes no argument, got 'digits:{arg}'")
    images, labels = load_digits_arrays()
    return _digits_bundle("digits", images, labels, size, test, aug, seed, val_fraction)


def _hard_digits(
    arg: str,
    size: int | None,
    test: int | None,
    aug: AugmentConfig | None,
    seed: int,
    val_fraction: float,
) -> DataBundle:
    from normfree.data.hard_digits import load_hard_digits_arrays, parse_hard_digits_spec

    images, labels = load_hard_digits_arrays(parse_hard_digits_spec(arg))
    return _digits_bundle("hard-digits", images, labels, size, test, aug, seed, val_fraction)


def _digits_bundle(
    name: str,
    images: Tensor,
    labels: Tensor,
    size: int | None,
    test: int | None,
    aug: AugmentConfig | None,
    seed: int,
    val_fraction: float,
) -> DataBundle:
    tr, va = stratified_split(labels, val_fraction, seed)
    stats = _channel_stats(images[tr])
    classes = [str(i) for i in range(10)]
    return _tensor_bundle(
        name,
        (images[tr], labels[tr]),
        (images[va], labels[va]),
        stats,
        10,
        size,
        test,
        aug,
        classes,
    )


def _cifar(
    kind: str, arg: str, size: int | None, test: int | None, aug: AugmentConfig | None
) -> DataBundle:
    from normfree.data.cifar import CIFAR_MEAN_STD, load_cifar_arrays

    if not arg:
        raise ValueError(f"{kind} needs a path: '{kind}:/dir/with/the/python/archive'")
    train, val, classes = load_cifar_arrays(kind, arg)
    return _tensor_bundle(
        kind, train, val, CIFAR_MEAN_STD[kind], len(classes), size, test, aug, classes
    )


def _imagefolder(
    arg: str,
    size: int | None,
    test: int | None,
    aug: AugmentConfig | None,
    seed: int,
    val_fraction: float,
) -> DataBundle:
    from normfree.data.imagefolder import ImageFolderDataset, scan_image_folder

    if not arg:
        raise ValueError("imagefolder needs a path: 'imagefolder:/dir'")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"expected an image-folder tree at {root} (root/<class>/<image> or "
            "root/{train,val}/<class>/<image>): not a directory"
        )
    tree = root / "train" if (root / "train").is_dir() else root
    if tree == root and (root / "val").is_dir():  # else val/ would be read as one class
        raise FileNotFoundError(
            f"expected {root}/train/<class>/<image> next to {root}/val/: there is no train/ "
            "folder (a class-folder tree without a split has no val/ folder)"
        )
    files, labels, classes = scan_image_folder(tree)
    if tree != root and (root / "val").is_dir():
        vfiles, vlabels, _ = scan_image_folder(root / "val", classes)
    else:
        tr, va = stratified_split(labels, val_fraction, seed)
        vfiles, vlabels = [files[i] for i in va.tolist()], labels[va]
        files, labels = [files[i] for i in tr.tolist()], labels[tr]
    size = size or 224
    test = test or size
    mean, std = IMAGENET_MEAN_STD
    return DataBundle(
        train=ImageFolderDataset(
            files, labels, build_transform(size, mean, std, aug, resize_crop_32=True)
        ),
        val=ImageFolderDataset(
            vfiles, vlabels, build_transform(test, mean, std, resize_crop_32=True)
        ),
        num_classes=len(classes),
        in_chans=3,
        image_size=size,
        test_size=test,
        name="imagefolder",
        mean=mean,
        std=std,
        classes=classes,
    )


def _synthetic(
    arg: str,
    size: int | None,
    test: int | None,
    aug: AugmentConfig | None,
    seed: int,
    val_fraction: float,
) -> DataBundle:
    from normfree.data.synthetic import SyntheticImageDataset, parse_synthetic_spec

    spec = parse_synthetic_spec(arg)
    _check_randaugment_channels(aug, spec.channels, f"synthetic:{arg}")
    n_val = spec.n_val or max(1, round(spec.n * val_fraction))
    placeholder = Compose([])
    train = SyntheticImageDataset(spec, spec.n, 0, seed, placeholder)
    val = SyntheticImageDataset(spec, n_val, 1, seed, placeholder)
    sample = torch.stack([train.raw(i) for i in range(min(spec.n, 64))])
    mean, std = _channel_stats(sample)
    size = size or spec.size
    test = test or size
    train.transform = build_transform(size, mean, std, aug)
    val.transform = build_transform(test, mean, std)
    return DataBundle(
        train,
        val,
        spec.num_classes,
        spec.channels,
        size,
        test,
        "synthetic",
        mean,
        std,
        [str(i) for i in range(spec.num_classes)],
    )


def build_datasets(
    spec: str,
    *,
    image_size: int | None = None,
    test_size: int | None = None,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> DataBundle:
    """Build the train / held-out datasets named by ``spec`` (see the module docstring).

    Args:
        spec: ``digits``, ``hard-digits[:size=N]``, ``cifar10:/path``, ``cifar100:/path``,
            ``imagefolder:/path`` or
            ``synthetic[:num_classes=…,size=…,channels=…,n=…,n_val=…,noise=…]``.
        image_size: training resolution (default: native; 224 for image folders).
        test_size: evaluation resolution (default: ``image_size``).
        augment: training augmentation; ``None`` means none (see :func:`default_augment` for
            each dataset's standard recipe). The val split is never augmented.
        seed: fixes held-out splits and synthetic data (augmentation draws come from the
            DataLoader-seeded global RNG instead).
        val_fraction: held-out share of every class where the data has no validation split.

    Raises:
        FileNotFoundError: a missing dataset path / file, with what was expected where.
        ValueError: an unknown spec, malformed data or a bad argument.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string ({_SPEC_HELP}), got {spec!r}")
    _check_size("image_size", image_size)
    _check_size("test_size", test_size)
    if augment is not None and not isinstance(augment, AugmentConfig):
        raise TypeError(f"augment must be an AugmentConfig or None, got {type(augment).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    kind, _, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "digits":
        return _digits(arg.strip(), image_size, test_size, augment, seed, val_fraction)
    if kind == "hard-digits":
        return _hard_digits(arg, image_size, test_size, augment, seed, val_fraction)
    if kind in ("cifar10", "cifar100"):
        return _cifar(kind, arg.strip(), image_size, test_size, augment)
    if kind == "imagefolder":
        return _imagefolder(arg.strip(), image_size, test_size, augment, seed, val_fraction)
    if kind == "synthetic":
        return _synthetic(arg, image_size, test_size, augment, seed, val_fraction)
    raise ValueError(f"unknown dataset spec {spec!r}; expected {_SPEC_HELP}")
