"""Where the architecture of a converted model comes from, as a JSON-able description that can
rebuild it without unpickling anything.

A *source spec* is one of:

* ``"torchvision:NAME"`` - ``torchvision.models.get_model(NAME, weights=None, **kwargs)``;
* ``"timm:NAME"`` - ``timm.create_model(NAME, pretrained=False, **kwargs)``;
* ``"normfree:NAME"`` or a registered normfree name - ``normfree.create_model(NAME, **kwargs)``;
* ``"package.module:factory"`` - an importable factory the user names (its module is imported).

Nothing is downloaded: pretrained weights are never requested here; weights come from files.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from normfree.convert.graph import ConversionError

__all__ = ["build_source", "infer_source"]


def build_source(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The (randomly initialised) model named by ``spec`` (see the module docstring)."""
    kwargs = dict(kwargs or {})
    kind, sep, name = spec.partition(":")
    if not sep:
        kind, name = "normfree", spec
    try:
        if kind == "torchvision":
            try:
                import torchvision
            except ImportError as e:
                raise ConversionError(f"{spec}: torchvision is not installed") from e
            return torchvision.models.get_model(name, weights=None, **kwargs)
        if kind == "timm":
            try:
                import timm
            except ImportError as e:
                raise ConversionError(f"{spec}: timm is not installed") from e
            return timm.create_model(name, pretrained=False, **kwargs)
        if kind == "normfree":
            from normfree.models import create_model

            return create_model(name, **kwargs)
        factory = getattr(importlib.import_module(kind), name, None)
    except (KeyError, ValueError, TypeError, RuntimeError, ModuleNotFoundError) as e:
        raise ConversionError(f"cannot build {spec!r} with {kwargs}: {e}") from e
    if not callable(factory):
        raise ConversionError(f"{spec!r}: module {kind} has no callable {name!r}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConversionError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def infer_source(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """The source spec of a normfree model (its registered name, classes and input channels),
    else None (torchvision / timm / own models need an explicit ``source=``)."""
    meta = getattr(model, "meta", None)
    head = getattr(model, "head", None)
    if meta is None or head is None or not hasattr(head, "num_classes"):
        return None
    return f"normfree:{meta.name}", {
        "num_classes": int(head.num_classes),
        "in_chans": int(getattr(model, "in_chans", 3)),
    }
