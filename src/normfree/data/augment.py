"""Per-example image transforms on ``(C, H, W)`` tensors: crops, flips, resizing, normalisation.

**Crops and flips come from torchvision** when it is installed:
:func:`crop_flip_transforms` returns ``torchvision.transforms.v2`` ``RandomCrop(padding=…)``,
``RandomResizedCrop(antialias=True)`` and ``RandomHorizontalFlip``. The classes
:class:`PadRandomCrop`, :class:`RandomResizedCrop` and :class:`RandomHorizontalFlip` here are the
**tensor-only fallback** for the core install (``pip install normfree`` without the ``vision``
extra trains on digits, CIFAR archives and synthetic data); they draw the same distributions
(uniform pad offsets, the 10-try Inception window with the same central fallback, p = 1/2), but
not the same random stream, so a seed reproduces a run only within one environment.
Resizing (:class:`Resize`, :class:`ResizeShortSide`: antialiased ``F.interpolate``), the
deterministic :class:`CenterCrop` and :class:`Normalize` are plain torch in both cases.

Every transform is picklable (no lambdas), so datasets work with multi-worker
:class:`~torch.utils.data.DataLoader`\\ s. Random draws use torch's **global** RNG inside
``__getitem__`` (torchvision's transforms do too); the DataLoader seeds it per worker from its
``generator`` (and ``normfree.train`` additionally forks it per example), so augmentation is
reproducible given the loader's seed.

Inception crop (Szegedy et al. 2015): area 8–100 %, aspect 3/4–4/3, up to 10 tries, else the
centre crop; NFNet eval (Brock et al. 2021b): resize the short side to ``test + 32`` and
centre-crop ``test`` (``resize_crop_32``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from normfree.data._optional import optional_tv_transforms
from normfree.data.randaugment import RandAugment

__all__ = [
    "CROP_MODES",
    "AugmentConfig",
    "CenterCrop",
    "Compose",
    "Normalize",
    "PadRandomCrop",
    "RandAugmentUint8",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "ResizeShortSide",
    "crop_flip_transforms",
    "resize_image",
    "to_uint8",
]

CROP_MODES = ("none", "pad", "random_resized")


@dataclass
class AugmentConfig:
    """Training augmentation (train split only; evaluation is deterministic).

    Attributes:
        crop: ``"none"``, ``"pad"`` (zero-pad by ``pad`` then random crop back, CIFAR style) or
            ``"random_resized"`` (Inception crop, area 0.08–1, aspect 3/4–4/3).
        pad: padding of the ``"pad"`` crop in pixels.
        flip: random horizontal flip with probability 1/2.
        randaugment: ``(num_ops, magnitude)`` in the official NFNet level semantics, where
            10 is the nominal maximum and 15 is 1.5× it (NFNet F0 "405" = ``(4, 5)``); see
            :mod:`normfree.data.randaugment` for the per-op formulas and the mapping to
            torchvision's magnitude bins. Needs torchvision.
        scale / ratio: area and aspect range of the ``"random_resized"`` crop.
    """

    crop: str = "none"
    pad: int = 4
    flip: bool = False
    randaugment: tuple[int, int] | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"AugmentConfig.crop must be one of {CROP_MODES}, got {self.crop!r}")
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"AugmentConfig.pad must be an int >= 0, got {self.pad!r}")
        if not isinstance(self.flip, bool):
            raise TypeError(f"AugmentConfig.flip must be a bool, got {self.flip!r}")
        if self.randaugment is not None:
            ra = tuple(self.randaugment) if isinstance(self.randaugment, (tuple, list)) else ()
            if len(ra) != 2:
                raise ValueError(
                    "AugmentConfig.randaugment must be (num_ops, magnitude), got "
                    f"{self.randaugment!r}"
                )
            self.randaugment = (ra[0], ra[1])
        for name in ("scale", "ratio"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ValueError(f"AugmentConfig.{name} must be a pair (lo, hi), got {value!r}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"AugmentConfig.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}"
            )
        rlo, rhi = self.ratio
        if not 0 < rlo <= rhi:
            raise ValueError(f"AugmentConfig.ratio must satisfy 0 < lo <= hi, got {self.ratio}")

    @property
    def is_identity(self) -> bool:
        """No random augmentation at all."""
        no_pad = self.crop == "none" or (self.crop == "pad" and self.pad == 0)
        return no_pad and not self.flip and self.randaugment is None


def to_uint8(x: Tensor) -> Tensor:
    """Round half up and saturate a float tensor to ``uint8``.

    Adds 0.5 and truncates instead of ``torch.round``, whose CPU kernel can be orders of
    magnitude slower on small tensors when intra-op threads are contended.
    """
    return (x + 0.5).clamp_(0, 255).to(torch.uint8)


def resize_image(img: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Antialiased resize of a ``(C, H, W)`` image to ``size``; ``uint8`` stays ``uint8``."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    x = img.float() if img.dtype == torch.uint8 else img
    out = F.interpolate(x[None], size=size, mode=mode, align_corners=False, antialias=True)[0]
    if img.dtype == torch.uint8:
        return to_uint8(out)
    return out


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[object]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Tensor) -> Tensor:
        for t in self.transforms:
            img = t(img)  # type: ignore[operator]
        return img

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Resize:
    """Resize to a square ``size`` (the tensor datasets' base step; a no-op at native size)."""

    def __init__(self, size: int, mode: str = "bilinear") -> None:
        self.size, self.mode = int(size), mode

    def __call__(self, img: Tensor) -> Tensor:
        return resize_image(img, (self.size, self.size), self.mode)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class ResizeShortSide:
    """Resize so the shorter side equals ``size`` (aspect ratio kept)."""

    def __init__(self, size: int, mode: str = "bicubic") -> None:
        self.size, self.mode = int(size), mode

    def __call__(self, img: Tensor) -> Tensor:
        h, w = img.shape[-2:]
        s = self.size / min(h, w)
        return resize_image(img, (max(1, round(h * s)), max(1, round(w * s))), self.mode)

    def __repr__(self) -> str:
        return f"ResizeShortSide({self.size})"


class CenterCrop:
    """Central ``size``×``size`` crop (the image must be at least that large)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, img: Tensor) -> Tensor:
        h, w = img.shape[-2:]
        if h < self.size or w < self.size:
            raise ValueError(f"CenterCrop({self.size}) got a smaller image {h}x{w}")
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return img[..., top : top + self.size, left : left + self.size]

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class PadRandomCrop:
    """Zero-pad by ``pad`` pixels on every side, then crop a random window of the input size."""

    def __init__(self, pad: int) -> None:
        self.pad = int(pad)

    def __call__(self, img: Tensor) -> Tensor:
        if self.pad == 0:
            return img
        h, w = img.shape[-2:]
        p = self.pad
        padded = F.pad(img, (p, p, p, p), mode="constant", value=0)
        top = int(torch.randint(2 * p + 1, ()).item())
        left = int(torch.randint(2 * p + 1, ()).item())
        return padded[..., top : top + h, left : left + w]

    def __repr__(self) -> str:
        return f"PadRandomCrop({self.pad})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, img: Tensor) -> Tensor:
        return img.flip(-1) if bool(torch.rand(()) < self.p) else img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip({self.p})"


class RandomResizedCrop:
    """Inception crop: a random window of ``scale`` area and ``ratio`` aspect, resized to ``size``.

    Ten tries as in torchvision and the official ``distorted_bounding_box_crop``; if none fits,
    the largest central crop with the aspect ratio clamped to ``ratio``.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        mode: str = "bilinear",
    ) -> None:
        self.size, self.scale, self.ratio, self.mode = int(size), tuple(scale), tuple(ratio), mode

    def window(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Sample ``(top, left, h, w)`` from the global RNG."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            u = torch.rand(2).tolist()
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(height - h + 1, ()).item())
                left = int(torch.randint(width - w + 1, ()).item())
                return top, left, h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Tensor) -> Tensor:
        top, left, h, w = self.window(*img.shape[-2:])
        crop = img[..., top : top + h, left : left + w]
        return resize_image(crop, (self.size, self.size), self.mode)

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio})"


class RandAugmentUint8:
    """Run :class:`RandAugment` on a ``uint8`` view of the image (float images in [0, 1] are
    quantised to 256 levels and converted back)."""

    def __init__(self, num_ops: int, magnitude: float) -> None:
        self.randaugment = RandAugment(num_ops, magnitude)

    def __call__(self, img: Tensor) -> Tensor:
        if img.dtype == torch.uint8:
            return self.randaugment(img)
        u8 = to_uint8(img * 255.0)
        return self.randaugment(u8).to(img.dtype) / 255.0

    def __repr__(self) -> str:
        return repr(self.randaugment)


class Normalize:
    """``uint8`` → float in [0, 1] (÷255), then ``(x − mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"Normalize needs matching mean/std with std > 0, got {mean}, {std}")
        self.mean = torch.tensor([float(m) for m in mean]).view(-1, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(-1, 1, 1)

    def __call__(self, img: Tensor) -> Tensor:
        x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def crop_flip_transforms(
    size: int, augment: AugmentConfig, mode: str = "bilinear", use_torchvision: bool | None = None
) -> tuple[list[object], list[object]]:
    """``(crop, flip)`` steps of ``augment`` for an output of ``size``×``size``.

    ``crop`` is ``[]``, a pad-then-random crop (of the ``size``×``size`` image the base step
    made) or the Inception crop straight to ``size`` (replacing the base step); ``flip`` is
    ``[]`` or a horizontal flip with p = 1/2. ``use_torchvision=None`` uses
    ``torchvision.transforms.v2`` when it is installed and the tensor-only classes of this module
    otherwise; ``True`` / ``False`` force one (``True`` without torchvision raises ImportError).
    """
    v2 = optional_tv_transforms() if use_torchvision in (None, True) else None
    if use_torchvision and v2 is None:
        raise ImportError('torchvision crops need torchvision: pip install "normfree[vision]"')
    crop: list[object] = []
    if augment.crop == "random_resized":
        if v2 is not None:
            interp = getattr(v2.InterpolationMode, mode.upper())
            crop.append(
                v2.RandomResizedCrop(
                    size, augment.scale, augment.ratio, interpolation=interp, antialias=True
                )
            )
        else:
            crop.append(RandomResizedCrop(size, augment.scale, augment.ratio, mode=mode))
    elif augment.crop == "pad" and augment.pad > 0:
        if v2 is not None:
            crop.append(v2.RandomCrop(size, padding=augment.pad, fill=0))
        else:
            crop.append(PadRandomCrop(augment.pad))
    flip: list[object] = []
    if augment.flip:
        flip.append(v2.RandomHorizontalFlip(0.5) if v2 is not None else RandomHorizontalFlip())
    return crop, flip
