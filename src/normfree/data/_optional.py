"""Lazy imports of the optional dependencies of :mod:`normfree.data` with clear install hints."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "optional_tv_transforms",
    "require_pil",
    "require_sklearn_datasets",
    "require_tv_functional",
]

_VISION_HINT = 'pip install "normfree[vision]"'
_DATASETS_HINT = 'pip install "normfree[datasets]"'


def _import(name: str, what: str, hint: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
        raise ImportError(f"{what} needs the optional package {name!r}: {hint}") from exc


def require_tv_functional(what: str) -> ModuleType:
    """``torchvision.transforms.v2.functional`` (RandAugment's image ops)."""
    return _import("torchvision.transforms.v2.functional", what, _VISION_HINT)


def optional_tv_transforms() -> ModuleType | None:
    """``torchvision.transforms.v2`` when torchvision is installed, else None (the caller then
    uses its tensor-only fallback)."""
    try:
        return importlib.import_module("torchvision.transforms.v2")
    except ImportError:  # pragma: no cover - exercised only without torchvision
        return None


def require_pil(what: str) -> ModuleType:
    """``PIL.Image`` (decoding image-folder files; Pillow ships with torchvision)."""
    _import("torchvision", what, _VISION_HINT)
    return _import("PIL.Image", what, _VISION_HINT)


def require_sklearn_datasets(what: str) -> ModuleType:
    """``sklearn.datasets`` (the bundled 8×8 digits)."""
    return _import("sklearn.datasets", what, _DATASETS_HINT)
