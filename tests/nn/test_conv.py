"""Shared plain convs (normfree.nn.conv): He-normal init statistics, padding, width rule."""

from __future__ import annotations

import math

import pytest
import torch

from normfree.nn import HeConv2d, grouped_width


@pytest.mark.parametrize(
    ("mode", "fan"), [("fan_in", 64 * 9), ("fan_out", 128 * 9)], ids=["fan_in", "fan_out"]
)
def test_he_conv_weight_std_follows_its_fan(mode: str, fan: int) -> None:
    torch.manual_seed(0)
    conv = HeConv2d(64, 128, 3, stride=2, mode=mode)
    # 73,728 samples of N(0, 2/fan): the sample std is within 1% of sqrt(2/fan)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan), rel=0.01)
    assert conv.bias is not None and torch.count_nonzero(conv.bias) == 0
    assert conv.padding == (1, 1) and conv.stride == (2, 2)
    assert HeConv2d(8, 8, 1, bias=False).bias is None


def test_he_conv_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        HeConv2d(8, 16, 3, mode="fan_avg")


def test_grouped_width_rounds_down_to_whole_groups() -> None:
    assert grouped_width(1536, 0.5, 128) == (768, 6)
    assert grouped_width(384, 0.5, 128) == (128, 1)  # int(192) // 128 = 1 group (NFNet-F+ stage 1)
    with pytest.raises(ValueError, match="no group left"):
        grouped_width(64, 0.5, 128)
