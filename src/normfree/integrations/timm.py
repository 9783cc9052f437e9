"""Make normfree models timm models: :func:`register_timm_models` adds every normfree model to
timm's registry, so ``timm.create_model("normfree_nfnet_f0")``, timm's ``train.py`` /
``validate.py`` (``--model normfree_nfnet_f0``) and ``timm.data.resolve_data_config`` work
with them unchanged. Each model is registered with its ``pretrained_cfg``
(:mod:`normfree.integrations.timm_cfgs`), so what timm looks up before it builds a model
(``timm.models.resolve_model_input_args``, ``get_pretrained_cfg_value``) has the model's own input
sizes, crop and first conv rather than timm's generic defaults.

timm is optional: this module imports it when :func:`register_timm_models` runs and fails with a
one-line hint when it is missing (``pip install "normfree[timm]"``). timm's scripts need the
registration to happen in their process, e.g. a two-line launcher::

    from normfree.integrations.timm import register_timm_models
    register_timm_models(); import runpy; runpy.run_path("train.py", run_name="__main__")

The timm entrypoint forwards every keyword to :func:`normfree.models.create_model`, which has
timm's semantics (``pretrained`` loads a local ``pretrained_cfg_overlay=dict(file=...)``;
nothing is downloaded). timm's ``checkpoint_path=`` reads what ``normfree.load_pretrained``
reads: the models it builds take timm's ``dm_nfnet_f*`` key names in ``load_state_dict``,
and ``.npz`` files go to :meth:`NormFreeModel.load_pretrained`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from normfree.checkpoints.timm import is_timm_state_dict, timm_to_normfree
from normfree.integrations import timm_models
from normfree.integrations.timm_cfgs import shipped_cfgs
from normfree.models import create_model, list_models
from normfree.models.features import FeatureExtractor

__all__ = ["register_timm_models"]


def _import_timm() -> Any:
    try:
        return importlib.import_module("timm.models")
    except ImportError as err:
        raise ImportError(
            f"normfree.integrations.timm needs timm ({err}); install it with "
            "pip install \"normfree[timm]\""
        ) from None


def _read_timm_layout(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *_: Any
) -> None:
    """``load_state_dict`` pre-hook: a timm ``dm_nfnet_f*`` state dict is renamed to normfree's
    keys (:func:`normfree.checkpoints.timm_to_normfree`) before it loads. timm's own loaders
    call ``model.load_state_dict`` on what they read: ``timm.create_model(...,
    checkpoint_path=)``, ``train.py --initial-checkpoint`` / ``--resume``. normfree's state
    dicts have no such keys, so they pass unchanged."""
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not is_timm_state_dict(own):
        return
    for key in own:
        del state_dict[prefix + key]
    state_dict.update({prefix + k: v for k, v in timm_to_normfree(own).items()})


def _entrypoint(name: str, timm_name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        model = create_model(name, pretrained=pretrained, **kwargs)
        network = model.model if isinstance(model, FeatureExtractor) else model
        network.register_load_state_dict_pre_hook(_read_timm_layout)
        return model

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
    cfgs = shipped_cfgs()
    for name in names:
        timm_name = prefix + name
        if not models.is_model(timm_name):
            fn = _entrypoint(name, timm_name)
            setattr(timm_models, timm_name, fn)
            if name in cfgs:  # timm reads a module's default_cfgs when it registers a model
                timm_models.default_cfgs[timm_name] = cfgs[name]
            models.register_model(fn)
        registered.append(timm_name)
    return registered
