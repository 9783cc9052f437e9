"""RandAugment with the level semantics of the official NFNet code (Cubuk et al. 2020; Brock et al.
2021b, App. C).

**Official semantics.** NFNets use ``cutmix_mixup_randaugment_{405,410,415}``: "4LL" means
``num_layers=4`` at magnitude ``LL``. Every layer picks one of 16 ops uniformly at random and
applies it with *fixed* strength ``f = level / _MAX_LEVEL`` where ``_MAX_LEVEL = 10``, so level 15
is 1.5× the nominal maximum. Per op (``f`` as above, sizes in pixels of a ~224 px image):

===============================  =============================================================
AutoContrast, Equalize, Invert   no argument
Rotate                           ±30·f degrees (random sign), empty pixels filled with 128
ShearX / ShearY                  ±0.3·f shear about the top-left corner
TranslateX / TranslateY          ±100·f px (``translate_const=100``)
Posterize                        keep ``int(4·f)`` high bits (level 0 keeps none: all black)
Solarize                         invert pixels ≥ ``int(256·f)`` (level 15: threshold 384, a no-op)
SolarizeAdd                      add ``int(110·f)`` to pixels < 128, clip to [0, 255]
Color, Contrast, Brightness,     blend with the degenerate image by factor ``0.1 + 1.8·f``
Sharpness                        (level 5 is the identity; no random sign)
Cutout                           grey (128) square of side ``2·int(40·f)`` px at a random centre
===============================  =============================================================

This module implements exactly these formulas, with two resolution-independent changes: the
translation and Cutout constants are fractions of the image side (``100/224`` and ``40/224``, equal
to the official pixel counts at 224 px, so they also make sense on 32 px CIFAR images), and
Contrast blends with the true mean grey level (the official op divides the histogram *count* by
256 instead of taking the mean intensity).

**torchvision's bins.** ``torchvision.transforms.v2.RandAugment(num_ops, magnitude,
num_magnitude_bins=B)`` uses the fraction ``magnitude / (B - 1)`` of its per-op maxima: rotate 30°,
shear 0.3, translate 150/331 of the side, *signed* enhance factors ``1 ± 0.9``, posterize 8→4 bits
and solarize threshold 255→0 (both *strengthening* with magnitude, unlike the official ones), over
14 ops (no Invert, Cutout, SolarizeAdd; an Identity op). With ``B = 11`` its magnitude ``m``
therefore equals official level ``m`` for the geometric ops, but a level above 10 (NFNet F3–F7
use 15) cannot be expressed (the last bin is 100 %), hence this implementation.

**Randomness** comes from torch's global RNG (op choice, sign, Cutout position), which a
:class:`~torch.utils.data.DataLoader` seeds per worker; images are ``uint8`` ``(C, H, W)`` tensors
with 1 or 3 channels. The official code applies RandAugment *after* MixUp/CutMix; here it runs per
example inside the dataset, i.e. before the batch-level :class:`~normfree.data.BatchMixer`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normfree.data._optional import require_tv_functional

__all__ = ["MAX_LEVEL", "RANDAUGMENT_OPS", "RandAugment", "level_to_arg"]

MAX_LEVEL = 10.0
RANDAUGMENT_OPS: tuple[str, ...] = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
    "SolarizeAdd",
)
_SIGNED = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
_ENHANCE = frozenset({"Color", "Contrast", "Brightness", "Sharpness"})


def level_to_arg(
    op: str,
    level: float,
    height: int,
    width: int,
    translate_fraction: float = 100.0 / 224.0,
    cutout_fraction: float = 40.0 / 224.0,
) -> float | int | None:
    """Unsigned argument of ``op`` at ``level`` (``f = level / 10``; see the module docstring)."""
    f = float(level) / MAX_LEVEL
    if op in ("AutoContrast", "Equalize", "Invert"):
        return None
    if op == "Rotate":
        return 30.0 * f
    if op in ("ShearX", "ShearY"):
        return 0.3 * f
    if op == "TranslateX":
        return translate_fraction * width * f
    if op == "TranslateY":
        return translate_fraction * height * f
    if op == "Posterize":
        return min(int(4.0 * f), 8)
    if op == "Solarize":
        return int(256.0 * f)
    if op == "SolarizeAdd":
        return int(110.0 * f)
    if op in _ENHANCE:
        return 0.1 + 1.8 * f
    if op == "Cutout":
        return int(cutout_fraction * min(height, width) * f)
    raise ValueError(f"unknown RandAugment op {op!r}; expected one of {RANDAUGMENT_OPS}")


def _cutout(img: Tensor, half: int, fill: int) -> Tensor:
    _, h, w = img.shape
    cy = int(torch.randint(h, ()).item())
    cx = int(torch.randint(w, ()).item())
    out = img.clone()
    out[:, max(0, cy - half) : min(h, cy + half), max(0, cx - half) : min(w, cx + half)] = fill
    return out


class RandAugment:
    """``num_ops`` random ops at fixed official ``magnitude`` (level; 10 = nominal maximum).

    Args:
        num_ops: layers per image (NFNet: 4).
        magnitude: official level (NFNet F0: 5, F1–F2: 10, F3+: 15).
        ops: the op names to draw from (default: the official 16).
        fill: value of pixels uncovered by geometric ops and Cutout (official: 128).
    """

    def __init__(
        self,
        num_ops: int,
        magnitude: float,
        *,
        ops: tuple[str, ...] = RANDAUGMENT_OPS,
        fill: int = 128,
        translate_fraction: float = 100.0 / 224.0,
        cutout_fraction: float = 40.0 / 224.0,
    ) -> None:
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"RandAugment num_ops must be an int >= 0, got {num_ops!r}")
        if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)):
            raise TypeError(f"RandAugment magnitude must be a number, got {magnitude!r}")
        if not (magnitude >= 0 and math.isfinite(magnitude)):
            raise ValueError(f"RandAugment magnitude must be finite and >= 0, got {magnitude}")
        unknown = [op for op in ops if op not in RANDAUGMENT_OPS]
        if unknown or not ops:
            raise ValueError(
                f"unknown RandAugment ops {unknown}; expected a subset of {RANDAUGMENT_OPS}"
            )
        require_tv_functional("RandAugment")
        self.num_ops = num_ops
        self.magnitude = float(magnitude)
        self.ops = tuple(ops)
        self.fill = int(fill)
        self.translate_fraction = float(translate_fraction)
        self.cutout_fraction = float(cutout_fraction)

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude:g})"

    def apply_op(self, img: Tensor, op: str, arg: float | int | None) -> Tensor:
        """Apply one op with its (already signed) argument to a ``uint8`` ``(C, H, W)`` image."""
        F = require_tv_functional("RandAugment")
        fill = [float(self.fill)] * img.shape[0]
        if op == "AutoContrast":
            return F.autocontrast(img)
        if op == "Equalize":
            return F.equalize(img)
        if op == "Invert":
            return 255 - img
        if op == "Rotate":
            return F.rotate(img, angle=float(arg), fill=fill)
        if op in ("ShearX", "ShearY"):
            deg = math.degrees(math.atan(float(arg)))
            shear = [deg, 0.0] if op == "ShearX" else [0.0, deg]
            return F.affine(
                img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, fill=fill, center=[0, 0]
            )
        if op in ("TranslateX", "TranslateY"):
            t = [float(arg), 0.0] if op == "TranslateX" else [0.0, float(arg)]
            return F.affine(img, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0], fill=fill)
        if op == "Posterize":
            shift = 8 - int(arg)
            return img & ((0xFF << shift) & 0xFF)
        if op == "Solarize":
            return torch.where(img.to(torch.int16) < int(arg), img, 255 - img)
        if op == "SolarizeAdd":
            added = (img.to(torch.int16) + int(arg)).clamp_(0, 255).to(torch.uint8)
            return torch.where(img < 128, added, img)
        if op == "Color":
            return F.adjust_saturation(img, float(arg))
        if op == "Contrast":
            return F.adjust_contrast(img, float(arg))
        if op == "Brightness":
            return F.adjust_brightness(img, float(arg))
        if op == "Sharpness":
            return F.adjust_sharpness(img, float(arg))
        if op == "Cutout":
            return _cutout(img, int(arg), self.fill)
        raise ValueError(f"unknown RandAugment op {op!r}")

    def __call__(self, img: Tensor) -> Tensor:
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] not in (1, 3):
            raise ValueError(
                "RandAugment expects a uint8 (C, H, W) image with 1 or 3 channels, got "
                f"{img.dtype} {tuple(img.shape)}"
            )
        _, h, w = img.shape
        for _ in range(self.num_ops):
            op = self.ops[int(torch.randint(len(self.ops), ()).item())]
            arg = level_to_arg(
                op, self.magnitude, h, w, self.translate_fraction, self.cutout_fraction
            )
            if op in _SIGNED and bool(torch.rand(()) < 0.5):
                arg = -arg  # type: ignore[operator]
            img = self.apply_op(img, op, arg)
        return img
