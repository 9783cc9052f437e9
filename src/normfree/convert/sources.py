"""Where the architecture of a converted model comes from, as a JSON-able description that can
rebuild it without unpickling anything.

A *source spec* is one of:

* ``"torchvision:NAME"`` - ``torchvision.models.get_model(NAME, weights=None, **kwargs)``
  (with ``weights_backbone=None`` for builders that take it);
* ``"timm:NAME"`` - ``timm.create_model(NAME, pretrained=False, **kwargs)``;
* ``"normfree:NAME"`` or a registered normfree name - ``normfree.create_model(NAME, **kwargs)``;
* ``"package.module:factory"`` - an importable factory the user names (its module is imported).

Nothing is downloaded: pretrained weights are never requested here; weights come from files.

A converted-model *file* names its source spec too, and a file is untrusted input: rebuilding a
``package.module:factory`` imports and calls whatever the file names (``os:system`` included).
:func:`check_file_source` therefore lets a file name only torchvision, timm and normfree
architectures and the factories normfree ships (:data:`SHIPPED_FACTORIES`), with no option that
would load another file, unless the reader opts in: ``trust_code=True`` in Python, or the
:func:`trusting_code` block that ``--trust-code`` opens for a command.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import os
import re
from collections.abc import Iterator
from typing import Any

from torch import nn

from normfree.checkpoints.errors import CheckpointError
from normfree.convert.graph import ConversionError

__all__ = [
    "SHIPPED_FACTORIES", "build_source", "check_file_source", "file_loading_options",
    "infer_source", "trusting_code",
]  # fmt: skip

# ``package.module:factory`` sources a file may name without an opt-in: normfree's own
SHIPPED_FACTORIES = frozenset({"normfree.convert.experiment:bn_resnet_small"})
_REGISTRIES = ("torchvision", "timm", "normfree")
_LOADS_FILES = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                          "checkpoint_path", "weights", "weights_backbone",
                          "pretrained_backbone"})  # fmt: skip
_OPT_IN = ("pass --trust-code (Python: load_converted(..., trust_code=True), or the code in a "
           "`with normfree.convert.trusting_code():` block) only if you trust where it came from")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # a registered name: resnet50.a1_in1k
_TRUST_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_code", default=False)


def file_loading_options(kwargs: dict[str, Any] | None) -> list[str]:
    """The options among ``kwargs`` with which a model builder loads another file
    (``checkpoint_path``, ``pretrained``, ``pretrained_cfg``...): a file's stored options must
    not choose what else is read."""
    return sorted(k for k in _LOADS_FILES & set(kwargs or {}) if kwargs[k])  # type: ignore[index]


@contextlib.contextmanager
def trusting_code(enabled: bool = True) -> Iterator[None]:
    """Within the block (when ``enabled``), converted-model files may name any source spec: what
    a command's ``--trust-code`` opens around its work. Only for files from a source you trust."""
    token = _TRUST_CODE.set(enabled or _TRUST_CODE.get())
    try:
        yield
    finally:
        _TRUST_CODE.reset(token)


def check_file_source(
    spec: str, kwargs: dict[str, Any] | None, path: str | os.PathLike[str], trust_code: bool = False
) -> None:
    """Refuse (:class:`CheckpointError`) a source spec read from the file ``path`` that would run
    code the file chooses or load another file (see the module docstring)."""
    if not isinstance(spec, str) or not isinstance(kwargs, (dict, type(None))):
        raise CheckpointError(f"{path}: its description's source is not a spec and options")
    if trust_code or _TRUST_CODE.get():
        return
    kind, _, name = spec.partition(":") if ":" in spec else ("normfree", ":", spec)
    if kind not in _REGISTRIES and spec not in SHIPPED_FACTORIES:
        raise CheckpointError(
            f"{path} names the architecture {spec!r}, a Python callable that building it would "
            "import and run; only torchvision:, timm: and normfree: architectures are built "
            f"unasked: {_OPT_IN}"
        )
    if kind in _REGISTRIES and not _PLAIN_NAME.fullmatch(name):  # timm:hf-hub:..., local-dir:
        raise CheckpointError(
            f"{path} names the architecture {spec!r}, which is not a plain {kind} model name "
            f"(it would read a folder or download a configuration): {_OPT_IN}"
        )
    loads = file_loading_options(kwargs)
    if loads:
        raise CheckpointError(
            f"{path}: the options {loads} of the architecture {spec!r} would load another "
            f"file: {_OPT_IN}"
        )


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
            return _torchvision_model(torchvision, name, kwargs)
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
    try:
        model = factory(**kwargs)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ConversionError(f"cannot build {spec!r} with {kwargs}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ConversionError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _torchvision_model(torchvision: Any, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``get_model(name, weights=None)``, and ``weights_backbone=None`` for the segmentation and
    detection builders unless asked otherwise: their default would download an ImageNet
    backbone."""
    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs = {"weights_backbone": None, **kwargs}
    return builder(weights=None, **kwargs)


def infer_source(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """The source spec of a normfree model (its registered name, classes, input channels and
    its dropout and stochastic-depth rates, which a conversion keeps for training), else None
    (torchvision / timm / own models need an explicit ``source=``)."""
    meta = getattr(model, "meta", None)
    head = getattr(model, "head", None)
    if meta is None or head is None or not hasattr(head, "num_classes"):
        return None
    return f"normfree:{meta.name}", {
        "num_classes": int(head.num_classes),
        "in_chans": int(getattr(model, "in_chans", 3)),
        "drop_rate": float(meta.drop_rate),
        "stochdepth_rate": float(meta.stochdepth_rate),
    }
