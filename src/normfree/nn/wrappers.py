"""The model inside the wrappers PyTorch puts around one: ``DistributedDataParallel`` and
``DataParallel`` (``.module``) and ``torch.compile``'s module (its one child, ``_orig_mod``).
A wrapper's ``state_dict`` prefixes every key with that attribute's name; weights are saved,
loaded and averaged on the model itself so that files carry the plain keys."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TypeVar

from torch import nn

__all__ = ["WRAPPER_PREFIXES", "strip_wrapper_prefixes", "unwrap_model"]

#: Key prefixes a wrapper's ``state_dict`` adds (DDP / DataParallel, ``torch.compile``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

V = TypeVar("V")


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without its DDP / DataParallel / ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        children = dict(model.named_children())
        if list(children) == ["_orig_mod"] and not list(model.named_parameters(recurse=False)):
            model = children["_orig_mod"]  # torch.compile's OptimizedModule
            continue
        return model


def strip_wrapper_prefixes(
    state: Mapping[str, V], model_keys: Collection[str] = ()
) -> dict[str, V]:
    """``state`` with the wrapper prefixes (``module.``, ``_orig_mod.``, nested) that *every*
    key carries taken off, as a state dict saved from a wrapped model has them (timm's
    ``clean_state_dict`` does this for ``module.``); other state dicts are returned as they
    are. Given the target's own keys (``model_keys``), stripping stops as soon as the keys
    meet them: a model whose one child is named ``module`` keeps that prefix."""
    out = dict(state)
    own = set(model_keys)
    while out and not (own and own.intersection(out)):
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in out)), None)
        if prefix is None:
            break
        out = {k[len(prefix):]: v for k, v in out.items()}
    return out
