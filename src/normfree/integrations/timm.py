"""Make normfree models timm models: :func:`register_timm_models` adds every normfree model to
timm's registry, so ``timm.create_model("normfree_nfnet_f0")``, timm's ``train.py`` /
``validate.py`` (``--model normfree_nfnet_f0``) and ``timm.data.resolve_data_config`` work
with them unchanged.

timm is optional: this module imports it when :func:`register_timm_models` runs and fails with a
one-line hint when it is missing (``pip install "normfree[timm]"``). timm's scripts need the
registration to happen in their process, e.g. a two-line launcher::

    from normfree.integrations.timm import register_timm_models
    register_timm_models(); import runpy; runpy.run_path("train.py", run_name="__main__")

The timm entrypoint forwards every keyword to :func:`normfree.models.create_model`, which has
timm's semantics (``pretrained`` loads a local ``pretrained_cfg_overlay=dict(file=...)``;
nothing is downloaded).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from normfree.integrations import timm_models
from normfree.models import create_model, list_models

__all__ = ["register_timm_models"]


def _import_timm() -> Any:
    try:
        return importlib.import_module("timm.models")
    except ImportError as err:
        raise ImportError(
            f"normfree.integrations.timm needs timm ({err}); install it with "
            "pip install \"normfree[timm]\""
        ) from None


def _entrypoint(name: str, timm_name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = timm_name
    entrypoint.__module__ = timm_models.__name__
    entrypoint.__doc__ = f"normfree's ``{name}`` (see ``normfree.models.create_model``)."
    entrypoint.normfree_name = name  # type: ignore[attr-defined]
    return entrypoint


def register_timm_models(prefix: str = "normfree_", pattern: str | None = None) -> list[str]:
    """Register normfree models in timm's model registry as ``prefix + name``.

    Args:
        prefix: prepended to every normfree name (``"normfree_nf_resnet50"``). It must keep the
            names apart from timm's own (timm has ``nf_resnet50``, ``nfnet_f0``…): a name that
            timm already holds for another model raises ``ValueError``.
        pattern: register only the normfree names matching this fnmatch pattern.

    Returns:
        The timm names registered (calling again re-uses them: the call is idempotent).
    """
    models = _import_timm()
    names = list_models(pattern)
    held = []
    for name in names:
        timm_name = prefix + name
        if not timm_name.isidentifier():
            raise ValueError(f"prefix {prefix!r} makes {timm_name!r}, not a valid model name")
        if models.is_model(timm_name):
            existing = models.model_entrypoint(timm_name)
            if getattr(existing, "normfree_name", None) != name:
                held.append(timm_name)
    if held:
        raise ValueError(
            f"timm already has models named {', '.join(held[:5])}"
            f"{'…' if len(held) > 5 else ''}: choose another prefix (e.g. 'normfree_')"
        )
    registered = []
    for name in names:
        timm_name = prefix + name
        if not models.is_model(timm_name):
            fn = _entrypoint(name, timm_name)
            setattr(timm_models, timm_name, fn)
            models.register_model(fn)
        registered.append(timm_name)
    return registered
