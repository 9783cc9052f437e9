"""count_params / count_flops: MACs of convs (grouped, strided, SAME), pooled 1×1 convs and
linears, in the official (real-valued sizes) and actual conventions, on meta and real models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normfree.models import count_flops, count_params
from normfree.nn import ScaledStdConv2d, SqueezeExcite


class _Toy(nn.Module):
    """3→8 3×3/2 SAME WS conv, grouped 3×3/2 conv (4 groups), SE, 1×1 conv, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.in_chans = 3
        self.conv_a = ScaledStdConv2d(3, 8, 3, stride=2)
        self.conv_b = ScaledStdConv2d(8, 16, 3, stride=2, groups=4)
        self.se = SqueezeExcite(16, 4)
        self.conv_c = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_c(self.se(self.conv_b(torch.relu(self.conv_a(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def _toy_macs(h_a: float, h_b: float) -> float:
    """By hand: conv_a at h_a² outputs, conv_b and conv_c at h_b² outputs, SE and fc once."""
    return (
        3 * 9 * 8 * h_a**2  # conv_a: (Cin/g)·k²·Cout per position
        + (8 // 4) * 9 * 16 * h_b**2  # conv_b: grouped
        + 2 * 16 * 4  # SE fc1/fc2 on the pooled 1×1 map
        + 16 * 32 * h_b**2  # conv_c
        + 32 * 10  # classifier
    )


def test_even_size_both_conventions_count_real_positions() -> None:
    model = _Toy()
    assert count_flops(model, 32) == _toy_macs(16, 8)
    assert count_flops(model, 32, convention="actual") == _toy_macs(16, 8)
    assert count_flops(model, (32, 32)) == _toy_macs(16, 8)


def test_odd_size_official_halves_real_valued_sizes_actual_uses_same_outputs() -> None:
    model = _Toy()
    # 10 -> 5 -> 2.5 (official, base.count_conv_flops) vs 10 -> 5 -> 3 (SAME: ceil)
    assert count_flops(model, 10) == round(_toy_macs(5, 2.5))
    assert count_flops(model, 10, convention="actual") == _toy_macs(5, 3)
    # rectangular images: positions are h·w
    rect = 3 * 9 * 8 * 8 * 4 + 2 * 9 * 16 * 4 * 2 + 128 + 16 * 32 * 4 * 2 + 320
    assert count_flops(model, (16, 8)) == rect


def test_counting_on_a_real_model_leaves_it_untouched() -> None:
    torch.manual_seed(0)
    model = _Toy().train()
    x = torch.randn(2, 3, 12, 12)
    model.eval()
    with torch.no_grad():
        before = model(x)  # builds the WS inference cache
    model.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert count_flops(model, 12) == _toy_macs(6, 3)
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.equal(p, params[n])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_meta_and_real_models_give_the_same_counts() -> None:
    real = _Toy()
    with torch.device("meta"):
        meta = _Toy()
    assert count_flops(meta, 20) == count_flops(real, 20) == _toy_macs(10, 5)
    assert count_params(meta) == count_params(real)
    expected = (3 * 9 * 8 + 16) + (2 * 9 * 16 + 32) + (16 * 4 + 4 + 4 * 16 + 16)
    expected += 16 * 32 + 32 + 32 * 10 + 10
    assert count_params(real) == expected


def test_count_params_counts_shared_parameters_once_and_can_skip_frozen() -> None:
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert count_params(model) == 20
    lin.bias.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 16


def test_linear_on_unpooled_tokens_and_plain_convs() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 4, stride=4)  # VALID patchify: 16 -> 4
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(2).transpose(1, 2))

    model = Tokens()
    per_token = 6 * 2
    assert count_flops(model, 16, in_chans=3) == 16 * 3 * 6 * 16 + 16 * per_token
    assert count_flops(model, 16, convention="actual") == 16 * 3 * 6 * 16 + 16 * per_token


def test_bad_arguments_raise_clear_errors() -> None:
    model = _Toy()
    with pytest.raises(ValueError, match="image_size"):
        count_flops(model, 0)
    with pytest.raises(ValueError, match="image_size"):
        count_flops(model, (3, 4, 5))
    with pytest.raises(ValueError, match="convention"):
        count_flops(model, 8, convention="paper")
    with pytest.raises(ValueError, match="in_chans"):
        count_flops(model, 8, in_chans=0)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        count_flops("resnet", 8)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        count_params(3)
    with pytest.raises(ValueError, match="in_chans"):
        count_flops(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), 2)
