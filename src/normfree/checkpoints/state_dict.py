"""Checked loading of a state dict: all-or-nothing unless ``strict=False``."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from normfree.checkpoints.errors import CheckpointMismatchError

__all__ = ["LoadReport", "compare_state_dict", "load_state_dict_checked"]


@dataclass
class LoadReport:
    """What a load did: parameters loaded and the differences that were tolerated."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def differences(self) -> list[str]:
        """Every name that is missing, unexpected or mis-shaped, sorted."""
        return sorted([*self.missing, *self.unexpected, *(k for k, _, _ in self.mismatched)])


def compare_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], exclude: Collection[str] = ()
) -> LoadReport:
    """Compare keys and shapes of ``state_dict`` with ``model.state_dict()`` without loading;
    the names in ``exclude`` are left out on both sides."""
    own = {k: v for k, v in model.state_dict().items() if k not in exclude}
    state_dict = {k: v for k, v in state_dict.items() if k not in exclude}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        (k, tuple(own[k].shape), tuple(state_dict[k].shape))
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    bad = {k for k, _, _ in mismatched}
    loaded = [k for k in own if k in state_dict and k not in bad]
    return LoadReport(loaded, missing, unexpected, mismatched)


def load_state_dict_checked(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    source: str = "checkpoint",
    exclude: Collection[str] = (),
) -> LoadReport:
    """Load ``state_dict`` into ``model``.

    With ``strict=True`` any missing, unexpected or mis-shaped entry raises
    :class:`CheckpointMismatchError` listing all of them, and nothing is loaded. With
    ``strict=False`` the entries whose name and shape match are loaded and the rest is reported.
    The names in ``exclude`` are neither loaded nor compared (the model keeps its own).
    """
    report = compare_state_dict(model, state_dict, exclude)
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise CheckpointMismatchError(report.missing, report.unexpected, report.mismatched, source)
    subset = {k: state_dict[k] for k in report.loaded}
    model.load_state_dict(subset, strict=False)
    return report
