"""NF-RegNet B0–B8 (Brock et al. 2021a): official structure, published parameter and MAC
counts, expected-variance schedule, SkipInit identity at init, forward contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normfree
from normfree.models import count_flops, count_params
from normfree.models.nf_regnet import NF_REGNET_VARIANTS, NFRegNet, NFRegNetBlock
from normfree.nn import AvgPool2dSame, ScaledStdConv2d, SqueezeExcite

ALPHA = 0.2
SILU_GAMMA = 1.7881293296813965  # official base.nonlinearities['silu']

# official parameter tree (DeepMind nfnets/nf_regnet.py) and official count_flops at the test size
PUBLISHED = {
    "B0": (8.595, 0.444),
    "B1": (10.019, 0.734),
    "B2": (13.786, 1.099),
    "B3": (18.137, 1.999),
    "B4": (29.316, 4.467),
    "B5": (48.707, 10.561),
    "B6": (70.046, 19.687),
    "B7": (101.743, 37.448),
    "B8": (142.314, 63.719),
}


def _meta_model(name: str, **kwargs) -> NFRegNet:
    with torch.device("meta"):
        return normfree.create_model(name, **kwargs)


def _reference_counts(widths, depths, size: int) -> tuple[int, float]:
    """Independent closed form of the official NF-RegNet tree and ``count_flops`` (real-valued
    spatial sizes, halved at every stride-2 layer)."""
    params, macs, h = 0, 0.0, float(size)

    def conv(cin, cout, k, groups=1, stride=1):
        nonlocal params, macs
        params += k * k * cin // groups * cout + 2 * cout
        macs += k * k * cin / groups * cout * h * h / stride**2

    ch = int(widths[0] * 0.75)
    conv(3, ch, 3, stride=2)
    h /= 2
    index = 0
    for width, depth in zip(widths, depths):
        out = int(width * 0.75)
        for b in range(depth):
            stride = 2 if b == 0 else 1
            mid = 8 * (int(ch * (1 if index == 0 else 2.25)) // 8)
            conv(ch, mid, 1)
            conv(mid, mid, 3, mid // 8, stride)
            h /= stride
            conv(mid, out, 1)
            if stride > 1 or ch != out:
                conv(ch, out, 1)
            hidden = mid // 2
            params += 2 * mid * hidden + hidden + mid + 1  # SE fcs and skip_gain
            macs += 2 * mid * hidden
            ch, index = out, index + 1
    final = 1280 * ch // 440
    conv(ch, final, 1)
    params += final * 1000 + 1000
    macs += final * 1000
    return params, macs


@pytest.mark.parametrize("variant", list(PUBLISHED))
def test_published_parameter_and_mac_counts(variant: str) -> None:
    v = NF_REGNET_VARIANTS[variant]
    model = _meta_model(f"nf_regnet_{variant.lower()}")
    params, macs = count_params(model), count_flops(model, v.test_size)
    want_params, want_macs = PUBLISHED[variant]
    assert round(params / 1e6, 3) == want_params
    assert round(macs / 1e9, 3) == want_macs
    ref_params, ref_macs = _reference_counts(v.widths, v.depths, v.test_size)
    assert params == ref_params
    assert macs == round(ref_macs)


def test_official_mac_convention_differs_from_actual_positions_on_odd_maps() -> None:
    """B2 at 272 px: the last stage sees 17 → 8.5 (official) vs 9 (real SAME output) positions."""
    model = _meta_model("nf_regnet_b2")
    assert count_flops(model, 272) == 1_099_455_477
    assert count_flops(model, 272, convention="actual") == 1_145_075_772
    b0 = _meta_model("nf_regnet_b0")  # 224 = 7·32: both conventions agree
    assert count_flops(b0, 224) == count_flops(b0, 224, convention="actual") == 443_672_488


def test_b0_structure_and_metadata() -> None:
    model = _meta_model("nf_regnet_b0")
    assert [n for n, _ in model.stem.named_children()] == ["conv"]  # no activation after it
    stem = model.stem.conv
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (
        3, 36, (3, 3), (2, 2))  # fmt: skip
    assert [fi.num_chs for fi in model.feature_info] == [36, 36, 78, 156, 330]
    assert [fi.reduction for fi in model.feature_info] == [2, 4, 8, 16, 32]
    blocks = [b for _, b in model.residual_blocks()]
    assert len(blocks) == 16 and all(isinstance(b, NFRegNetBlock) for b in blocks)
    # expansion 1 for the very first block (36 -> 32 after rounding to the group size 8),
    # 2.25 of the *input* channels afterwards
    assert (blocks[0].width, blocks[0].groups) == (32, 4)
    in_chs = [36] + [b.conv3.out_channels for b in blocks[:-1]]
    for block, in_ch in zip(blocks[1:], in_chs[1:]):
        assert block.width == 8 * (int(in_ch * 2.25) // 8) and block.groups == block.width // 8
    for stage in model.stages:
        first = stage[0]
        assert first.stride == 2 and isinstance(first.downsample.pool, AvgPool2dSame)
        assert all(b.stride == 1 and b.downsample is None for b in stage[1:])
    for b in blocks:
        assert isinstance(b.attn, SqueezeExcite) and b.attn.gate_gain == 2.0
        assert b.attn.fc1.in_channels == b.width and b.attn.fc1.out_channels == b.width // 2
        assert isinstance(b.attn.act, torch.nn.ReLU)
        assert b.act.name == "silu" and b.act.gamma == SILU_GAMMA
        assert all(isinstance(c, ScaledStdConv2d) for c in (b.conv1, b.conv2, b.conv3))
    assert [b.drop_path.drop_rate for b in blocks] == pytest.approx(
        [0.1 * i / 16 for i in range(16)]
    )
    assert model.final.conv.out_channels == 960  # int(1280·330 // 440)
    assert model.head.init_std == 0.0
    meta = model.meta
    assert (meta.family, meta.train_size, meta.test_size, meta.drop_rate, meta.stochdepth_rate) == (
        "nf_regnet", 192, 224, 0.2, 0.1)  # fmt: skip
    assert meta.recipe["agc"] is False and meta.recipe["weight_decay"] == 5e-5
    assert normfree.list_models("nf_regnet_*") == [f"nf_regnet_b{i}" for i in range(9)]


def test_beta_schedule_follows_expected_variance_with_resets() -> None:
    model = _meta_model("nf_regnet_b1")
    expected, var = [], 1.0
    for depth in NF_REGNET_VARIANTS["B1"].depths:
        for b in range(depth):
            expected.append(var**-0.5)
            var = (1.0 if b == 0 else var) + ALPHA**2
    assert [b.beta_multiplier for _, b in model.residual_blocks()] == pytest.approx(expected, 1e-12)


def _ws_conv(x: torch.Tensor, conv: ScaledStdConv2d) -> torch.Tensor:
    """Scaled WS conv with TF 'SAME' padding, written out."""
    w = conv.weight - conv.weight.mean(dim=(1, 2, 3), keepdim=True)
    w = w * torch.rsqrt(w.pow(2).sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-4))
    w = w * conv.gain.view(-1, 1, 1, 1)
    k, s = conv.kernel_size[0], conv.stride[0]
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), w, conv.bias, s, groups=conv.groups)


@pytest.mark.parametrize("stride,in_ch,out_ch", [(2, 16, 24), (1, 24, 24)])
def test_block_forward_matches_an_explicit_reference(stride: int, in_ch: int, out_ch: int) -> None:
    """Official order: SE on the expanded width between the grouped conv and the act."""
    torch.manual_seed(0)
    block = NFRegNetBlock(in_ch, out_ch, stride, beta_multiplier=0.9, alpha=ALPHA)
    with torch.no_grad():
        block.skip_gain.gain.fill_(-0.6)
        for p in block.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    block.eval()
    x = torch.randn(2, in_ch, 9, 9)

    def act(t):
        return F.silu(t) * SILU_GAMMA

    out = act(x) * 0.9
    if stride > 1:  # 9 -> 5: the last row/column averages one in-bounds pixel per axis
        pooled = F.avg_pool2d(F.pad(out, [0, 1, 0, 1]), 2, 2)
        counts = F.avg_pool2d(F.pad(torch.ones(1, 1, 9, 9), [0, 1, 0, 1]), 2, 2)
        shortcut = _ws_conv(pooled / counts, block.downsample.conv)
    else:
        shortcut = x
    r = _ws_conv(act(_ws_conv(out, block.conv1)), block.conv2)
    se = block.attn
    g = F.relu(F.conv2d(r.mean(dim=(2, 3), keepdim=True), se.fc1.weight, se.fc1.bias))
    r = 2 * torch.sigmoid(F.conv2d(g, se.fc2.weight, se.fc2.bias)) * r
    r = _ws_conv(act(r), block.conv3)
    expected = r * -0.6 * ALPHA + shortcut
    with torch.no_grad():
        got = block(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_b0_forward_batch_independence_intermediates_and_zero_init_classifier() -> None:
    torch.manual_seed(0)
    model = normfree.create_model("nf_regnet_b0").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        logits = model.forward_head(model.final(feats[-1]))
        # zero-initialised classifier: exactly zero logits at init
        assert logits.shape == (1, 1000) and torch.count_nonzero(logits) == 0
        assert [f.shape[1] for f in feats] == [fi.num_chs for fi in model.feature_info]
        assert [64 // f.shape[-1] for f in feats] == [fi.reduction for fi in model.feature_info]
        # SkipInit gains are 0: stage 0 (a single transition block) outputs its shortcut
        block = model.stages[0][0]
        assert len(model.stages[0]) == 1 and block.downsample is not None
        torch.testing.assert_close(  # γ/β rides in the shortcut conv's weight: up to rounding
            feats[1],
            block.downsample(block.act(feats[0]) * block.beta_multiplier),
            rtol=1e-5,
            atol=1e-6,
        )
        model.reset_classifier(7)
        for _, b in model.residual_blocks():
            b.skip_gain.gain.fill_(1.0)
        model.head.fc.weight.normal_()
        x = torch.randn(8, 3, 32, 32)
        full = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(8)])
    assert full.shape == (8, 7) and full.abs().max() > 0
    torch.testing.assert_close(single, full, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_tiny_nf_regnet_scripts_and_trains_at_batch_one() -> None:
    torch.manual_seed(0)
    model = NFRegNet(depths=(1, 1, 1, 1), widths=(16, 32, 48, 64), num_classes=3,
                     skipinit_init=1.0, stochdepth_rate=0.0, drop_rate=0.0).eval()  # fmt: skip
    x = torch.randn(2, 3, 37, 37)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), ref, rtol=1e-5, atol=1e-5)
    model.train()
    F.cross_entropy(model(x[:1]), torch.tensor([0])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_configurations_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="one entry per stage"):
        NFRegNet(depths=(1, 2), widths=(48,))
    with pytest.raises(ValueError, match="group size"):
        NFRegNet(depths=(1,), widths=(8,))  # int(0.75·8) = 6 channels < one group of 8
    for bad in (0, -8):  # 0 was a ZeroDivisionError
        with pytest.raises(ValueError, match="group_size must be a positive int"):
            NFRegNet(depths=(1, 1, 1, 1), widths=(48, 104, 208, 440), group_size=bad)
    with pytest.raises(TypeError):
        normfree.create_model("nf_regnet_b0", not_an_option=1)
