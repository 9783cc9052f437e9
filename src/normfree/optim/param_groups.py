"""Optimizer parameter groups built from what the model *declares* (never from name guessing).

The NFNet recipe (Brock et al. 2021b, App. C; DeepMind ``nfnets/experiment_nfnets.py``) uses
three groups: gains and biases without weight decay; the final classifier
weight with weight decay but without AGC; every other weight with both. Here the split comes from
the :class:`~normfree.models.NormFreeModel` contract:

* ``model.no_weight_decay_names()`` – parameters that take no weight decay (gains, biases,
  scalars);
* ``model.classifier_parameter_names()`` – the final linear layer, which AGC leaves alone
  ("it is always better not to clip the final linear layer", Brock et al. 2021b §4.1);
  ``clip_classifier="bias"`` clips its bias as the official code does
  (:func:`normfree.optim.agc.unclipped_classifier`);
* ``model.lr_scale(name)`` – per-parameter learning-rate multipliers (Fixup's scalar biases and
  multipliers at lr/10, Zhang et al. 2019 §3);
* ``model.meta.recipe["agc"]`` – False for BatchNorm baselines (no clipping anywhere).

Every group carries the torch keys ``params``, ``param_names`` (torch ≥ 2.6 stores them),
``lr`` and ``weight_decay``, plus ``lr_scale`` and ``clipping`` (the AGC λ, ``None``: not
clipped) read by :class:`normfree.optim.AGC`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from normfree.optim.agc import ClassifierClipping, unclipped_classifier

__all__ = ["build_param_groups", "describe_param_groups"]


def _declared(model: nn.Module, attr: str, names: set[str]) -> set[str]:
    fn = getattr(model, attr, None)
    if fn is None:
        return set()
    declared = set(fn())
    unknown = declared - names
    if unknown:
        raise ValueError(
            f"model.{attr}() names parameters the model does not have: {sorted(unknown)}"
        )
    return declared


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    clipping: float | None = 0.01,
    *,
    clip_classifier: ClassifierClipping = False,
    extra_no_weight_decay: Iterable[str] = (),
    lr_scale: Callable[[str], float] | None = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into optimizer groups.

    Args:
        model: a :class:`~normfree.models.NormFreeModel` (any ``nn.Module`` works: without the
            declarations every parameter decays, is clipped and has lr scale 1).
        lr: the peak learning rate; a group's ``lr`` is ``lr · lr_scale``.
        weight_decay: decay for the parameters not in ``no_weight_decay_names()``.
        clipping: AGC λ for the clipped groups, ``None`` to disable AGC everywhere. A model whose
            ``meta.recipe["agc"]`` is False (BN baselines) is never clipped.
        clip_classifier: ``False``: the classifier is not clipped (the paper); ``"bias"``: its
            bias is, its weight not (DeepMind's code); ``True``: both are.
        extra_no_weight_decay: further parameter names to exclude from weight decay.
        lr_scale: per-parameter lr multiplier ``name -> float``; default ``model.lr_scale``
            when the model declares it, else 1 (e.g. :func:`normfree.nn.fixup_lr_scale` for a
            plain module holding Fixup scalars).

    Returns:
        Groups in a deterministic order (first appearance of each kind in
        ``named_parameters()``), each with keys ``params``, ``param_names``, ``lr``,
        ``lr_scale``, ``weight_decay``, ``clipping`` and a readable ``group_name``.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if clipping is not None and clipping <= 0:
        raise ValueError(f"clipping must be positive or None, got {clipping}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = {n for n, _ in model.named_parameters()}
    no_decay = _declared(model, "no_weight_decay_names", names)
    if isinstance(extra_no_weight_decay, str):  # one name, not its characters
        extra_no_weight_decay = [extra_no_weight_decay]
    extra = set(extra_no_weight_decay)
    if extra - names:
        raise ValueError(f"extra_no_weight_decay names unknown parameters: {sorted(extra - names)}")
    no_decay |= extra
    _declared(model, "classifier_parameter_names", names)  # checks what the model declares
    unclipped = set(unclipped_classifier(model, clip_classifier))
    meta = getattr(model, "meta", None)
    recipe = getattr(meta, "recipe", {}) or {}
    if not recipe.get("agc", True):
        clipping = None
    lr_scale_fn = lr_scale if lr_scale is not None else getattr(model, "lr_scale", None)

    groups: dict[tuple[bool, float, float | None], dict[str, Any]] = {}
    for name, param in named:
        decay = name not in no_decay
        scale = float(lr_scale_fn(name)) if lr_scale_fn is not None else 1.0
        if scale <= 0:
            raise ValueError(f"model.lr_scale({name!r}) must be positive, got {scale}")
        clip = None if clipping is None or name in unclipped else clipping
        key = (decay, scale, clip)
        if key not in groups:
            label = ("decay" if decay else "no_decay") + ("" if clip is not None else "_noclip")
            label += "" if scale == 1.0 else f"_lr{scale:g}"
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
                "clipping": clip,
                "group_name": label,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def describe_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A JSON-friendly summary of the groups (name, sizes and hyper-parameters) for logs."""
    out = []
    for g in groups:
        out.append(
            {
                "group_name": g.get("group_name", ""),
                "num_tensors": len(g["params"]),
                "num_params": int(sum(p.numel() for p in g["params"])),
                "lr_scale": g.get("lr_scale", 1.0),
                "weight_decay": g.get("weight_decay", 0.0),
                "clipping": g.get("clipping"),
            }
        )
    return out
