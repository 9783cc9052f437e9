"""Model registry: ``create_model(name, **overrides)`` and ``list_models(pattern)``."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import inspect
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from normfree.models.base import NormFreeModel

__all__ = [
    "UnknownModelError",
    "create_model",
    "list_models",
    "model_entrypoint",
    "register_model",
    "set_weights_loader",
]

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


def _patterns(value: str | Sequence[str] | None, what: str) -> list[str]:
    """One fnmatch pattern or a list/tuple of them (timm's ``filter`` / ``exclude_filters``)."""
    if value is None or isinstance(value, str):
        return [value] if value else []
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return [p for p in value if p]
    raise TypeError(f"{what} must be a str or a list of str, got {type(value).__name__}")


def list_models(
    pattern: str | Sequence[str] | None = None,
    exclude_filters: str | Sequence[str] | None = None,
) -> list[str]:
    """Registered model names, sorted, optionally filtered as timm's ``list_models``: names that
    match the fnmatch ``pattern`` (or any of a list of patterns), minus those that match
    ``exclude_filters`` (a pattern or a list). Matching is case-sensitive."""
    include = _patterns(pattern, "pattern")
    exclude = _patterns(exclude_filters, "exclude_filters")
    _ensure_loaded()
    names = sorted(_REGISTRY)
    if include:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]
    return [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


def model_entrypoint(name: str) -> Callable[..., NormFreeModel]:
    """The factory registered as ``name`` (:class:`UnknownModelError` with close names when
    there is none)."""
    if not isinstance(name, str):
        raise TypeError(f"a model name must be a str, got {type(name).__name__}")
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


#: Loads a weights file (path) into a model; installed by :mod:`normfree` (the checkpoint
#: layer's ``load_pretrained``), which sits above the models in the package layering.
#: It takes ``trust_pickle=True`` for DeepMind's pickled ``.npz`` files.
_WEIGHTS_LOADER: list[Callable[..., Any]] = []

#: timm keywords with no normfree counterpart: accepted only when unset (``None``), as timm's
#: scripts pass them.
_UNSUPPORTED = {
    "drop_block_rate": "normfree models have no DropBlock",
    "bn_momentum": "set BatchNorm momentum on the modules after creation",
    "bn_eps": "set BatchNorm eps on the modules after creation",
}


def set_weights_loader(loader: Callable[..., Any]) -> None:
    """Install the function ``create_model(pretrained=True)`` loads weight files with
    (``loader(model, path)``, and ``trust_pickle=True`` when the cfg says so)."""
    _WEIGHTS_LOADER[:] = [loader]


_INTERNAL = ("self", "meta")  # constructor arguments that are not user options


def _options(fn: Callable[..., NormFreeModel]) -> dict[str, Any]:
    """``{option: default}`` of the model class a factory returns (its return annotation) and
    of the factory itself; ``{}`` where the class cannot be told."""
    try:
        cls = typing.get_type_hints(fn).get("return")
    except Exception:  # (an annotation that does not resolve)
        return {}
    if not isinstance(cls, type):
        return {}
    out: dict[str, Any] = {}
    for func in (getattr(cls, "__init__"), fn):  # noqa: B009 (the class's, for its signature)
        for p in inspect.signature(func).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _INTERNAL:
                out.setdefault(p.name, p.default)
    return out


def _default_num_classes(fn: Callable[..., NormFreeModel]) -> int:
    param = inspect.signature(fn).parameters.get("num_classes")
    default = None if param is None else param.default
    return default if isinstance(default, int) else 1000


def _resolve_pretrained_cfg(
    name: str, pretrained_cfg: Any, overlay: dict[str, Any] | None
) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` argument (``None``, a tag string, a dict or timm's
    ``PretrainedCfg``) plus ``pretrained_cfg_overlay`` as one dict of overrides."""
    cfg: dict[str, Any] = {}
    if isinstance(pretrained_cfg, str):
        if pretrained_cfg:
            raise ValueError(
                f"{name} has no pretrained tag {pretrained_cfg!r}: normfree models carry no "
                "tagged weights; pass pretrained_cfg_overlay=dict(file=PATH)"
            )
    elif dataclasses.is_dataclass(pretrained_cfg) and not isinstance(pretrained_cfg, type):
        cfg.update({f.name: getattr(pretrained_cfg, f.name)
                    for f in dataclasses.fields(pretrained_cfg)})  # fmt: skip
    elif isinstance(pretrained_cfg, dict):
        cfg.update(pretrained_cfg)
    elif pretrained_cfg is not None:
        raise TypeError(
            f"pretrained_cfg must be a dict, a tag string or None, got "
            f"{type(pretrained_cfg).__name__}"
        )
    cfg.update(overlay or {})
    return cfg


def _load_pretrained(model: NormFreeModel, cfg: dict[str, Any]) -> None:
    state, file = cfg.get("state_dict"), cfg.get("file")
    if state is None and not file:
        remote = [k for k in ("url", "hf_hub_id") if cfg.get(k)]
        hint = (f" (its {' / '.join(remote)} is not downloaded: fetch the file yourself)"
                if remote else "")  # fmt: skip
        raise ValueError(
            f"pretrained=True needs a local weights file for {model.meta.name}{hint}: pass "
            "pretrained_cfg_overlay=dict(file=PATH) (normfree, timm or DeepMind .npz weights), "
            "or pretrained=False with checkpoint_path=PATH; normfree downloads nothing"
        )
    # DeepMind's official files are pickles: read only on the cfg's explicit opt-in
    options: dict[str, Any] = {"trust_pickle": True} if cfg.get("trust_pickle") is True else {}
    if model.in_chans != 3 and cfg.get("first_conv"):  # timm's rule for RGB weights
        options["adapt_first_conv"] = f"{cfg['first_conv']}.weight"
    # a state dict in memory goes through the same steps as a file's (timm's names, the first
    # conv's adaptation, the checked all-or-nothing load)
    load_weights_file(model, state if state is not None else str(file), **options)


def load_weights_file(
    model: nn.Module, path: str | os.PathLike[str] | Mapping[str, Any], **options: Any
) -> Any:
    """Load a weights file (or a state dict in memory) into ``model`` with the installed loader
    (the checkpoint layer's ``normfree.load_pretrained``: every format it reads; ``options``
    are its keywords)."""
    if not _WEIGHTS_LOADER:  # pragma: no cover - installed whenever normfree is imported
        raise RuntimeError("no weights loader installed: import normfree first")
    return _WEIGHTS_LOADER[0](model, path if isinstance(path, Mapping) else str(path), **options)


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: int | None = None,
    *,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    global_pool: str | None = None,
    drop_path_rate: float | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, with the keywords and meanings of ``timm.create_model``.

    Args:
        name: a name from :func:`list_models`, e.g. ``"nf_resnet50"`` or ``"nfnet_f0"``.
        pretrained: load weights from the local file named by ``pretrained_cfg_overlay=
            dict(file=PATH)`` (or ``pretrained_cfg=dict(file=PATH)``); a clear ``ValueError``
            when none is given (nothing is downloaded). DeepMind's official ``F*_haiku.npz``
            files are pickles and load only with ``dict(file=PATH, trust_pickle=True)``.
            The weights are loaded into the model with the configuration's class count
            (``num_classes`` of the cfg, the family's default unless overlaid); a different
            ``num_classes`` then gets a fresh classifier.
        num_classes: size of the classifier (0: no classifier, pooled features out); ``None``
            takes the cfg's ``num_classes`` when one is given, else the family's default (1000
            for ImageNet models, 10 for the ``*_cifar*`` ones), as timm.
        pretrained_cfg / pretrained_cfg_overlay: a ``pretrained_cfg`` dict (or a timm
            ``PretrainedCfg``) and entries replacing those of the model's own
            (:attr:`NormFreeModel.pretrained_cfg`); the result is the model's ``pretrained_cfg``.
            As in timm, its ``num_classes`` and ``input_size[0]`` are the defaults of
            ``num_classes`` and ``in_chans``.
        checkpoint_path: a weights file loaded (strictly) after creation, as in timm.
        features_only: return a :class:`~normfree.models.features.FeatureExtractor` of the
            feature maps ``out_indices`` (timm's rule; ``None`` all of them) instead.
        global_pool: ``"avg"`` (default), ``"max"``, ``"avgmax"``, ``"catavgmax"`` or ``""``
            (no pooling; needs ``num_classes=0``).
        drop_path_rate: timm's name of the stochastic-depth rate (normfree's
            ``stochdepth_rate``, which stays accepted).
        **overrides: architecture options of the family (``drop_rate``, ``stochdepth_rate``,
            ``in_chans``, ``alpha``, ``activation``, …); unknown options raise ``TypeError``.
            timm's ``cache_dir`` is ignored; ``output_stride`` must be 32 (no dilated variants);
            timm's ``device`` and ``dtype`` make the parameters there and in that dtype.
    """
    if not isinstance(pretrained, bool):
        raise TypeError(
            f"pretrained must be True or False, got {pretrained!r} (num_classes is the third "
            "argument, as in timm; pass it by keyword)"
        )
    fn = model_entrypoint(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}  # timm drops unset args
    overrides.pop("cache_dir", None)
    for key, why in _UNSUPPORTED.items():
        if key in overrides:
            raise ValueError(f"{key}={overrides[key]!r} is not supported: {why}")
    output_stride = overrides.pop("output_stride", 32)
    if output_stride != 32:
        raise ValueError(f"output_stride={output_stride} is not supported (only 32)")
    feature_cls = overrides.pop("feature_cls", None)
    if feature_cls not in (None, "getter", "list"):
        raise ValueError(f"feature_cls={feature_cls!r} is not supported (None, 'getter', 'list')")
    if drop_path_rate is not None:
        rate = overrides.get("stochdepth_rate", drop_path_rate)
        if rate != drop_path_rate:
            raise ValueError(
                f"drop_path_rate={drop_path_rate} and stochdepth_rate={rate} disagree: they are "
                "the same option, give one"
            )
        overrides["stochdepth_rate"] = drop_path_rate
    if not (
        num_classes is None
        or (isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 0)
    ):
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")

    cfg_updates = _resolve_pretrained_cfg(name, pretrained_cfg, pretrained_cfg_overlay)
    weights_classes = cfg_updates.get("num_classes", _default_num_classes(fn))
    # as timm (_update_default_model_kwargs): the cfg's class count and input_size channels are
    # the defaults of num_classes and in_chans, with or without pretrained weights
    build_classes = weights_classes if pretrained or num_classes is None else num_classes
    if build_classes is not None:
        overrides["num_classes"] = build_classes
    if cfg_updates.get("input_size") is not None:
        overrides.setdefault("in_chans", cfg_updates["input_size"][0])
    # timm's factory keywords (timm 1.0.31 passes them on): parameters on device, in dtype
    device, dtype = overrides.pop("device", None), overrides.pop("dtype", None)
    options = _options(fn)
    for key, value in overrides.items():
        if isinstance(options.get(key), bool) and not isinstance(value, bool):
            raise TypeError(f"{name}: option {key}={value!r} must be true or false")
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = fn(**overrides)
    except TypeError as e:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unknown is None or not options:
            raise
        close = difflib.get_close_matches(unknown.group(1), list(options), n=3, cutoff=0.6)
        hint = (f"did you mean {', '.join(close)}?" if close
                else f"its options: {', '.join(options)}")  # fmt: skip
        raise TypeError(f"{name} has no option {unknown.group(1)!r}; {hint}") from None
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    cfg = model.default_pretrained_cfg(num_classes=weights_classes)
    cfg.update(cfg_updates)
    model.pretrained_cfg = cfg
    if pretrained:
        _load_pretrained(model, cfg)
    wanted = model.num_classes if num_classes is None else num_classes
    if wanted != model.num_classes or (global_pool is not None
                                       and global_pool != model.head.global_pool):  # fmt: skip
        model.reset_classifier(wanted, global_pool)
    if checkpoint_path:
        load_weights_file(model, checkpoint_path)
    if features_only:
        from normfree.models.features import FeatureExtractor

        return FeatureExtractor(model, out_indices)
    if out_indices is not None:
        raise ValueError("out_indices needs features_only=True")
    return model
