"""timm state dicts of its DeepMind NFNet ports (``dm_nfnet_f0`` … ``dm_nfnet_f6``).

timm's keys follow the same module tree as normfree's NFNet except for three renames, and its
Scaled WS gains have shape ``(C, 1, 1, 1)`` where normfree (like the official code) uses ``(C,)``:

==============================  ================================
timm                            normfree
==============================  ================================
``stages.S.B.skipinit_gain``    ``stages.S.B.skip_gain.gain``
``final_conv.*``                ``final.conv.*``
``*.gain`` ``(C,1,1,1)``        ``*.gain`` ``(C,)``
==============================  ================================

Note that timm's ``dm_nfnet`` models compute GELU exactly and add ``eps`` to the variance, where
the official code (and normfree) use tanh-GELU and floor ``N·Var``; the weights are the same.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["is_timm_state_dict", "normfree_to_timm", "timm_to_normfree"]

_SKIP_TIMM = re.compile(r"^(stages\.\d+\.\d+)\.skipinit_gain$")
_SKIP_OURS = re.compile(r"^(stages\.\d+\.\d+)\.skip_gain\.gain$")


def is_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True if the keys or gain shapes are timm's (``skipinit_gain``, ``final_conv``, 4-D gains)."""
    return any(
        _SKIP_TIMM.match(k) or k.startswith("final_conv.")
        or (k.endswith(".gain") and v.dim() == 4)
        for k, v in state_dict.items()
    )


def timm_to_normfree(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/reshape a timm ``dm_nfnet_*`` state dict into normfree's NFNet keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _SKIP_TIMM.match(key)
        if m:
            key = f"{m.group(1)}.skip_gain.gain"
        elif key.startswith("final_conv."):
            key = "final.conv." + key[len("final_conv."):]
        if key.endswith(".gain") and value.dim() == 4:
            value = value.reshape(value.shape[0])
        out[key] = value
    return out


def normfree_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`timm_to_normfree` (load into ``timm.create_model('dm_nfnet_f0')``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _SKIP_OURS.match(key)
        if m:
            key = f"{m.group(1)}.skipinit_gain"
        elif key.startswith("final.conv."):
            key = "final_conv." + key[len("final.conv."):]
        if key.endswith(".gain") and value.dim() == 1:
            value = value.reshape(-1, 1, 1, 1)
        out[key] = value
    return out
