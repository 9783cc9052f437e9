"""Measurement points: dotted-name globs and residual-block discovery."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn

from normfree.analysis.points import (
    default_points,
    find_residual_blocks,
    glob_match,
    resolve_modules,
)


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("layer1.0", "layer?.*", True),
        ("layer1.0.conv1", "layer?.*", False),  # '*' does not cross dots
        ("layer1.0.conv1", "layer?.**", True),  # '**' does
        ("layer1.0.conv1", "**.conv1", True),
        ("layer1.0.conv1", "layer1.*.conv?", True),
        ("layer1.0.conv1", "layer1.*.conv[12]", True),
        ("layer1.0.conv3", "layer1.*.conv[!12]", True),
        ("layer1.0.conv1", "layer1.*.conv[!12]", False),
        ("layer1.0", "layer1.0", True),
        ("layer1x0", "layer1.0", False),  # '.' is literal
        ("stages.0.1", "stages.*", False),
        ("stages.0.1", "stages.*.*", True),
    ],
)
def test_glob_semantics(name: str, pattern: str, expected: bool) -> None:
    assert glob_match(name, pattern) is expected


def test_glob_differs_from_fnmatch_on_dots() -> None:
    # fnmatch's '*' crosses dots (the pitfall of timm.utils.model.ActivationStatsHook's
    # patterns); ours does not
    assert fnmatch.fnmatchcase("stages.0.1.conv1", "stages.*.*")
    assert not glob_match("stages.0.1.conv1", "stages.*.*")


def test_bad_patterns_raise_clear_errors() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="matches no module"):
        resolve_modules(model, ["conv*"])
    with pytest.raises(ValueError, match="unclosed"):
        glob_match("a", "[ab")
    with pytest.raises(ValueError, match="non-empty"):
        glob_match("a", "")


def test_resolve_modules_keeps_registration_order_without_duplicates() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    names = [n for n, _ in resolve_modules(model, ["2", "*", "0"])]
    assert names == ["0", "1", "2"]


class _Block(nn.Module):
    """A residual block in the torchvision style (``downsample`` attribute, maybe None)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.downsample = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return skip + self.conv(x)


def test_find_residual_blocks_by_shortcut_attribute() -> None:
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 4, 3))
    model.add_module("layer1", nn.Sequential(_Block(4, 4), _Block(4, 4)))
    model.add_module("layer2", nn.Sequential(_Block(4, 8), _Block(8, 8)))
    assert [n for n, _ in find_residual_blocks(model)] == [
        "layer1.0",
        "layer1.1",
        "layer2.0",
        "layer2.1",
    ]
    specs = default_points(model)
    assert [s.name for s in specs] == ["layer1.0:input", "layer1.0", "layer1.1", "layer2.0",
                                       "layer2.1"]  # fmt: skip
    assert [s.stage for s in specs] == [0, 0, 0, 1, 1]
    assert [s.is_transition for s in specs[1:]] == [False, False, True, False]
    assert specs[0].use_input and specs[0].kind == "stem"


def test_no_residual_blocks_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"could not find residual blocks in Sequential; pass"):
        default_points(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def test_torchvision_resnet_blocks_found() -> None:
    models = pytest.importorskip("torchvision.models")
    model = models.resnet18(weights=None)
    names = [n for n, _ in find_residual_blocks(model)]
    assert names == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


class ConvNeXtBlock(nn.Module):
    """A block known by its class name (timm's), with no shortcut attribute."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class _Stage(nn.Module):
    """timm's ``ConvNeXtStage`` layout: a ``downsample`` child, then a Sequential of blocks."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.downsample = nn.Conv2d(c_in, c_out, 2, stride=2) if c_in != c_out else nn.Identity()
        self.blocks = nn.Sequential(ConvNeXtBlock(c_out), ConvNeXtBlock(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def test_a_stage_with_a_downsample_attribute_is_not_taken_for_a_block() -> None:
    # timm's ConvNeXtStage has a `downsample` child: it was taken for one residual block and
    # its ConvNeXtBlocks, nested in it, were skipped (4 points for convnext_atto's 12 blocks)
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 4, 3))
    model.add_module("stages", nn.Sequential(_Stage(4, 4), _Stage(4, 8)))
    names = [n for n, _ in find_residual_blocks(model)]
    assert names == ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0",
                     "stages.1.blocks.1"]  # fmt: skip
    specs = default_points(model)
    assert [s.stage for s in specs[1:]] == [0, 0, 1, 1]
    # a torchvision-style block (found by its `downsample`) holding no block stays a block
    assert [n for n, _ in find_residual_blocks(nn.Sequential(_Block(4, 8)))] == ["0"]


def test_timm_convnext_blocks_found() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", pretrained=False)
    names = [n for n, _ in find_residual_blocks(model)]
    depths = (2, 2, 6, 2)
    assert names == [f"stages.{i}.blocks.{j}" for i, d in enumerate(depths) for j in range(d)]
