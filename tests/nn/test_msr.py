"""Mean Shift Rejection building blocks: zero-mean initialisation and channel noise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normfree.nn.msr import (
    ChannelNoise,
    apply_zero_mean_init,
    kernel_mean_dims,
    kernel_slice_means,
    zero_mean_conv_weights,
    zero_mean_init_,
)


def reference_zero_mean_init(w: torch.Tensor, magnitude: float | None) -> torch.Tensor:
    """Slow float64 reference, filter by filter and slice by slice."""
    w = w.detach().double().clone()
    out = torch.empty_like(w)
    one_by_one = all(s == 1 for s in w.shape[2:])
    for o in range(w.shape[0]):
        f = w[o].clone()
        before = f.norm().item()
        if one_by_one:
            f = f - f.mean()
        else:
            for i in range(f.shape[0]):
                f[i] = f[i] - f[i].mean()
        target = before if magnitude is None else magnitude
        out[o] = f * (target / f.norm().item())
    return out


# --------------------------------------------------------------------------------------------
# Zero-mean initialisation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("magnitude", [1.0, 2.5, None])
@pytest.mark.parametrize(
    "shape", [(8, 4, 3, 3), (6, 5, 1, 1), (4, 3, 1, 5), (4, 2, 3), (3, 2, 2, 2, 2)]
)
def test_zero_mean_init(shape: tuple[int, ...], magnitude: float | None) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) + 0.3  # non-zero means
    before = w.flatten(1).norm(dim=1)
    ref = reference_zero_mean_init(w, magnitude)
    assert zero_mean_init_(w, magnitude) is w
    assert kernel_slice_means(w).abs().max().item() < 1e-6
    norms = w.flatten(1).norm(dim=1)
    expected = before if magnitude is None else torch.full_like(norms, magnitude)
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(w.double(), ref, rtol=0, atol=1e-6)


def test_zero_mean_init_float64_is_exact() -> None:
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = reference_zero_mean_init(w, 1.0)
    zero_mean_init_(w)
    torch.testing.assert_close(w, ref, rtol=0, atol=1e-14)
    assert kernel_slice_means(w).abs().max().item() < 1e-15


def test_mean_dims() -> None:
    assert kernel_mean_dims((8, 4, 3, 3)) == (2, 3)
    assert kernel_mean_dims((8, 4, 1, 1)) == (1, 2, 3)  # 1x1: mean over input channels
    assert kernel_mean_dims((8, 4, 1, 3)) == (2, 3)
    assert kernel_slice_means(torch.zeros(8, 4, 3, 3)).shape == (8, 4, 1, 1)
    assert kernel_slice_means(torch.zeros(8, 4, 1, 1)).shape == (8, 1, 1, 1)
    with pytest.raises(ValueError, match="ndim >= 3"):
        kernel_mean_dims((8, 4))
    with pytest.raises(ValueError, match="one input channel"):
        kernel_mean_dims((8, 1, 1, 1))


def test_zero_mean_init_errors_and_zero_filters() -> None:
    with pytest.raises(ValueError, match="magnitude"):
        zero_mean_init_(torch.randn(2, 2, 3, 3), magnitude=0.0)
    with pytest.raises(TypeError, match="magnitude"):
        zero_mean_init_(torch.randn(2, 2, 3, 3), magnitude="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        zero_mean_init_(torch.ones(2, 2, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="cannot be rescaled"):
        zero_mean_init_(torch.ones(2, 2, 3, 3))  # constant slices vanish
    w = torch.zeros(2, 2, 3, 3)
    zero_mean_init_(w, magnitude=None)  # a zero filter keeps its (zero) norm
    assert w.eq(0).all()


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, bias=False)
        self.pw = nn.Conv2d(8, 8, 1)
        self.dw1x1 = nn.Conv2d(8, 8, 1, groups=8)  # cannot be zero-mean: skipped by default
        self.dw3x3 = nn.Conv2d(8, 8, 3, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2)  # different layout: never selected
        self.fc = nn.Linear(4, 2)


def test_apply_zero_mean_init_over_a_model() -> None:
    torch.manual_seed(2)
    model = Mixed()
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_zero_mean_init(model, magnitude=1.0)
    assert names == ["stem.weight", "pw.weight", "dw3x3.weight"]
    for name, w in zero_mean_conv_weights(model):
        assert kernel_slice_means(w).abs().max().item() < 1e-6, name
        torch.testing.assert_close(w.flatten(1).norm(dim=1), torch.ones(8))
    changed = {"stem.weight", "pw.weight", "dw3x3.weight"}
    for k, v in model.state_dict().items():
        if k not in changed:
            assert torch.equal(v, untouched[k]), k

    model = Mixed()
    assert apply_zero_mean_init(model, include=["stem", "pw"]) == ["stem.weight", "pw.weight"]
    assert apply_zero_mean_init(model, include=lambda n, m: n == "dw3x3") == ["dw3x3.weight"]
    with pytest.raises(ValueError, match="one input channel"):
        apply_zero_mean_init(model, include="dw*")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        apply_zero_mean_init(torch.zeros(3))  # type: ignore[arg-type]


def test_zero_mean_init_kills_a_constant_input() -> None:
    """The point of the isocline: a spatially constant input gives zero output (no mean shift)."""
    conv = nn.Conv2d(4, 6, 3, padding=0, bias=False)
    apply_zero_mean_init(conv)
    x = torch.randn(2, 4, 1, 1).expand(2, 4, 7, 7)
    assert conv(x).abs().max().item() < 1e-6


# --------------------------------------------------------------------------------------------
# Channel noise
# --------------------------------------------------------------------------------------------
def test_channel_noise_is_identity_in_eval() -> None:
    layer = ChannelNoise(delta=0.3, shift=0.2).eval()
    x = torch.randn(4, 3, 5, 5)
    assert layer(x) is x


def test_channel_noise_range_and_structure() -> None:
    torch.manual_seed(3)
    delta = 0.15
    layer = ChannelNoise(delta).train()
    x = torch.ones(64, 64, 3, 3)
    factors = layer(x)
    # one factor per (example, channel), constant over positions
    assert torch.equal(factors, factors[:, :, :1, :1].expand_as(factors))
    a = factors[:, :, 0, 0]
    assert a.min().item() >= 1 - delta and a.max().item() <= 1 + delta
    # U[1−δ, 1+δ] moments over 4096 draws (5 standard errors)
    assert abs(a.mean().item() - 1.0) < 5 * delta / (3**0.5 * 64)
    assert abs(a.var().item() - delta**2 / 3) < 5 * (delta**2 / 3) * (0.8 / 4096) ** 0.5
    # independent across channels and across examples (|corr| < 5/sqrt(4032))
    centred = a - a.mean()

    def corr(u: torch.Tensor, v: torch.Tensor) -> float:
        return float((u * v).mean() / (u.square().mean() * v.square().mean()).sqrt())

    assert abs(corr(centred[:, 1:], centred[:, :-1])) < 0.08
    assert abs(corr(centred[1:], centred[:-1])) < 0.08
    assert torch.linalg.matrix_rank(a).item() == 64
    # a fresh draw at every call
    assert not torch.equal(layer(x), factors)


def test_channel_noise_additive_shift_and_gradient() -> None:
    torch.manual_seed(4)
    layer = ChannelNoise(delta=0.1, shift=0.2).train()
    x = torch.full((32, 16, 2, 2), 2.0, requires_grad=True)
    out = layer(x)
    assert out.min().item() >= 2 * 0.9 - 0.2 and out.max().item() <= 2 * 1.1 + 0.2
    only_shift = ChannelNoise(delta=0.0, shift=0.2).train()(torch.zeros(32, 16))
    assert only_shift.abs().max().item() <= 0.2 and only_shift.std().item() > 0.05
    out.sum().backward()
    assert x.grad.min().item() >= 0.9 and x.grad.max().item() <= 1.1  # d out/d x = factor
    assert ChannelNoise(delta=0.0, shift=0.0).train()(x) is x


def test_channel_noise_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="delta"):
        ChannelNoise(delta=1.5)
    with pytest.raises(ValueError, match="shift"):
        ChannelNoise(shift=-0.1)
    with pytest.raises(TypeError, match="delta"):
        ChannelNoise(delta="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, C, \.\.\.\)"):
        ChannelNoise().train()(torch.randn(5))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_channel_noise_torchscript() -> None:
    layer = ChannelNoise(delta=0.2, shift=0.1).train()
    scripted = torch.jit.script(layer)
    x = torch.randn(4, 3, 2, 2)
    torch.manual_seed(5)
    a = scripted(x)
    torch.manual_seed(5)
    torch.testing.assert_close(a, layer(x), rtol=0, atol=0)
    scripted.eval()
    torch.testing.assert_close(scripted(x), x, rtol=0, atol=0)
