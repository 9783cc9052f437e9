"""Normalization layers for the normalized baselines.

:func:`group_norm_groups` picks the GroupNorm group count (Wu & He 2018, arXiv 1803.08494, §3.1:
32 groups by default) for the ResNet and EfficientNet baselines.
"""

from __future__ import annotations

__all__ = ["group_norm_groups"]


def group_norm_groups(channels: int, max_groups: int = 32, min_channels_per_group: int = 2) -> int:
    """Number of GroupNorm groups for ``channels``: the largest ``g ≤ max_groups`` that divides
    ``channels`` and leaves at least ``min_channels_per_group`` channels per group (at least 1).

    >>> [group_norm_groups(c) for c in (16, 32, 64, 256)]
    [8, 16, 32, 32]
    """
    if channels < 1 or max_groups < 1 or min_channels_per_group < 1:
        raise ValueError(
            f"channels, max_groups and min_channels_per_group must be >= 1, got {channels}, "
            f"{max_groups} and {min_channels_per_group}"
        )
    g = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % g:
        g -= 1
    return g
