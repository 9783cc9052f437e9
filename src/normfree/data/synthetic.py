"""Deterministic synthetic images with a learnable class signal, for benchmarks and tests.

Spec: ``synthetic`` or ``synthetic:num_classes=10,size=32,channels=3,n=512`` (also ``n_val``,
``noise``). Class ``c`` has a smooth random prototype (a 4×4 Gaussian pattern upsampled to
``size``); an example is ``128 + 40·(prototype_c + noise·ε)`` in ``uint8`` with i.i.d. Gaussian ε.
Everything is a function of ``(seed, split, index)``, generated lazily in ``__getitem__``, so
large synthetic sets cost no memory and are identical across runs and workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from normfree.data.augment import Compose, to_uint8
from normfree.data.base import ImageDataset

__all__ = ["SyntheticImageDataset", "SyntheticSpec", "parse_synthetic_spec"]

_MASK64 = (1 << 64) - 1


def _mix(*parts: int) -> int:
    """A 63-bit seed hashed from integers (splitmix64 chain)."""
    h = 0
    for p in parts:
        x = ((h ^ (int(p) & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = x ^ (x >> 31)
    return h >> 1


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of a synthetic dataset; ``n_val=None`` means ``max(1, round(n · val_fraction))``."""

    num_classes: int = 10
    size: int = 32
    channels: int = 3
    n: int = 512
    n_val: int | None = None
    noise: float = 1.0

    def __post_init__(self) -> None:
        # upper bounds: a spec can come from a checkpoint's stored config; the labels (8 bytes
        # an image, ≤ 1 GiB) and class prototypes (≤ 256 MiB) are allocated up front, and an
        # image is at most 4 GiB
        for name, lo, hi in (("num_classes", 2, 1 << 16), ("size", 1, 1 << 12),
                             ("channels", 1, 1 << 6), ("n", 1, 1 << 27)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"synthetic {name} must be an int in [{lo}, {hi}], got {value!r}")
        if self.n_val is not None and not 1 <= self.n_val <= 1 << 27:
            raise ValueError(f"synthetic n_val must be in [1, {1 << 27}], got {self.n_val}")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise ValueError(f"synthetic noise must be finite and >= 0, got {self.noise}")


def parse_synthetic_spec(options: str) -> SyntheticSpec:
    """Parse ``"num_classes=10,size=32"`` (the part after ``synthetic:``)."""
    types = {f.name: (float if f.name == "noise" else int) for f in fields(SyntheticSpec)}
    kwargs: dict[str, int | float] = {}
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"synthetic option {item!r} must be key=value")
        if key not in types:
            raise ValueError(f"unknown synthetic option {key!r}; expected one of {sorted(types)}")
        try:
            kwargs[key] = types[key](value.strip())
        except ValueError:
            raise ValueError(
                f"synthetic option {key}={value!r} is not a valid {types[key].__name__}"
            ) from None
    return SyntheticSpec(**kwargs)  # type: ignore[arg-type]


class SyntheticImageDataset(ImageDataset):
    """``n`` lazily generated ``uint8`` images of split ``split`` (0 train, 1 val)."""

    def __init__(
        self, spec: SyntheticSpec, n: int, split: int, seed: int, transform: Compose
    ) -> None:
        super().__init__(transform)
        self.spec, self.split, self.seed = spec, int(split), int(seed)
        g = torch.Generator().manual_seed(_mix(seed, 0x5EED))
        self.prototypes = torch.randn(spec.num_classes, spec.channels, 4, 4, generator=g)
        g_labels = torch.Generator().manual_seed(_mix(seed, split, 0x1AB))
        order = torch.randperm(n, generator=g_labels)
        self.labels = order % spec.num_classes  # balanced classes in a seeded order

    def raw(self, index: int) -> Tensor:
        s = self.spec
        index = index % len(self)
        g = torch.Generator().manual_seed(_mix(self.seed, self.split, index))
        proto = self.prototypes[int(self.labels[index])][None]
        pattern = F.interpolate(proto, size=(s.size, s.size), mode="bilinear", align_corners=False)
        noise = torch.randn(s.channels, s.size, s.size, generator=g)
        img = 128.0 + 40.0 * (pattern[0] + s.noise * noise)
        return to_uint8(img)
