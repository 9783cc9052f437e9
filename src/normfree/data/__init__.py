"""Datasets, augmentation and batch mixing for training normalizer-free networks.

* :func:`build_datasets` — ``digits`` (bundled), ``cifar10:/path`` / ``cifar100:/path``,
  ``imagefolder:/path`` and ``synthetic[:…]`` into a :class:`DataBundle`; nothing is downloaded.
* :class:`AugmentConfig` — pad / Inception crops, flips and RandAugment in the official NFNet
  level semantics (:mod:`normfree.data.randaugment`), applied to the train split only.
* :class:`BatchMixer` and :func:`soft_target_cross_entropy` — MixUp / CutMix and label smoothing
  after mixing (Brock et al. 2021b, App. C).

Augmentation draws use torch's global RNG inside ``__getitem__``, which
:class:`~torch.utils.data.DataLoader` seeds per worker from its ``generator``; all datasets are
picklable for multi-worker loading. torchvision is needed only for RandAugment and image folders
(``pip install "normfree[vision]"``), scikit-learn only for ``digits``
(``pip install "normfree[datasets]"``).
"""

from normfree.data.augment import AugmentConfig
from normfree.data.base import (
    DataBundle,
    ImageDataset,
    TensorImageDataset,
    build_transform,
    stratified_split,
)
from normfree.data.build import DATASET_KINDS, build_datasets, default_augment
from normfree.data.cifar import RestrictedUnpickler, load_cifar_arrays, safe_pickle_load
from normfree.data.mixing import BatchMixer, soft_target_cross_entropy
from normfree.data.randaugment import RandAugment

__all__ = [
    "DATASET_KINDS",
    "AugmentConfig",
    "BatchMixer",
    "DataBundle",
    "ImageDataset",
    "RandAugment",
    "RestrictedUnpickler",
    "TensorImageDataset",
    "build_datasets",
    "build_transform",
    "default_augment",
    "load_cifar_arrays",
    "safe_pickle_load",
    "soft_target_cross_entropy",
    "stratified_split",
]
