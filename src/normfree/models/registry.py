"""Model registry: ``create_model(name, **overrides)`` and ``list_models(pattern)``."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from normfree.models.base import NormFreeModel

__all__ = ["UnknownModelError", "create_model", "list_models", "model_entrypoint", "register_model"]

_REGISTRY: dict[str, Callable[..., NormFreeModel]] = {}
F = TypeVar("F", bound=Callable[..., NormFreeModel])


class UnknownModelError(KeyError):
    """Raised for a model name that is not registered; the message suggests close names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_model(fn: F) -> F:
    """Register a model constructor under its function name (``fn(num_classes=..., **kw)``)."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn


def _ensure_loaded() -> None:
    import normfree.models  # noqa: F401  (importing the package registers every family)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted, optionally filtered by an fnmatch ``pattern``."""
    _ensure_loaded()
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def model_entrypoint(name: str) -> Callable[..., NormFreeModel]:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} See normfree.list_models() for all "
            f"{len(_REGISTRY)} names."
        ) from None


def create_model(name: str, num_classes: int | None = None, **overrides: Any) -> NormFreeModel:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`, e.g. ``"nf_resnet50"`` or ``"nfnet_f0"``.
        num_classes: size of the classifier (0 for a feature extractor); ``None`` keeps the
            family's default (1000 for ImageNet models, 10 for the small-image ``*_cifar*`` ones).
        **overrides: architecture options of the family (``drop_rate``, ``stochdepth_rate``,
            ``in_chans``, ``alpha``, ``activation``, …); unknown options raise ``TypeError``.
    """
    fn = model_entrypoint(name)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    return fn(**overrides)
