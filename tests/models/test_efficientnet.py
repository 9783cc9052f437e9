"""EfficientNet B0–B5 in the G1/G16 × BN/GN/LN+PN variants: parameter and MAC counts against
torchvision, scaling rules, variant layouts, init, PN declarations and folding, batch
(in)dependence, resolutions recipe and training smoke tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import normfree
from normfree.models import count_flops, count_params
from normfree.models.efficientnet import (
    EFFICIENTNET_SCALING,
    EfficientNet,
    MBConv,
    ResidualMBConv,
    conv_groups,
    round_filters,
    round_repeats,
)
from normfree.nn import (
    FoldedProxyNormActivation,
    NormAct,
    ProxyNormActivation,
    ResidualBlock,
    fold_proxy_norm,
)

B0 = [f"efficientnet_b0_{c}_{n}" for c in ("g1", "g16") for n in ("bn", "gn", "lnpn")]
BATCH_FREE = [n for n in B0 if not n.endswith("_bn")]


pytestmark = pytest.mark.usefixtures("one_thread")


def _kxk_convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for n, m in model.named_modules() if n.endswith("dw_conv")]


def test_full_grid_is_registered_with_resolution_recipe() -> None:
    names = normfree.list_models("efficientnet_*")
    assert len(names) == 6 * 2 * 3
    reduced = {"b0": 160, "b1": 176, "b2": 196, "b3": 204, "b4": 252, "b5": 328}
    native = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456}
    dropout = {"b0": 0.2, "b1": 0.2, "b2": 0.3, "b3": 0.3, "b4": 0.4, "b5": 0.4}
    # every variant of b0 and one variant of every size: each property varies with one of them
    built = [n for n in names if n.startswith("efficientnet_b0_") or n.endswith("_g1_bn")]
    assert len(built) == 6 + 5
    with torch.device("meta"):
        for name in built:
            size = name.split("_")[1]
            meta = normfree.create_model(name).meta
            assert meta.name == name and meta.family == "efficientnet"
            assert (meta.train_size, meta.test_size) == (reduced[size], native[size])
            assert meta.recipe == {
                "agc": False, "native_size": native[size], "reduced_size": reduced[size],
                "finetune_size": native[size],
            }  # fmt: skip
            assert meta.drop_rate == dropout[size] and meta.stochdepth_rate == 0.2
            assert meta.uses_batch_stats == name.endswith("_bn")


def test_b0_g1_bn_has_the_standard_parameter_and_mac_counts() -> None:
    model = normfree.create_model("efficientnet_b0_g1_bn")
    assert count_params(model) == 5_288_548  # torchvision / TF EfficientNet-B0, 1000 classes
    macs = count_flops(model, 224)
    assert macs == pytest.approx(0.39e9, rel=0.02)  # Tan & Le 2019, Table 2: 0.39B FLOPS
    assert macs == 385_814_752


@pytest.mark.parametrize("size", list(EFFICIENTNET_SCALING))
def test_g1_bn_matches_torchvision(size: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    _, _, native, _, _ = EFFICIENTNET_SCALING[size]
    with torch.device("meta"):
        reference = getattr(torchvision.models, f"efficientnet_{size}")()
        ours = normfree.create_model(f"efficientnet_{size}_g1_bn")
    assert count_params(ours) == count_params(reference)
    assert count_flops(ours, native, convention="actual") == count_flops(
        reference, native, convention="actual"
    )
    ref_convs = [tuple(m.weight.shape) for m in reference.modules() if isinstance(m, nn.Conv2d)]
    assert sorted(tuple(m.weight.shape) for m in ours.modules() if isinstance(m, nn.Conv2d)) == (
        sorted(ref_convs)
    )


def test_scaling_rules() -> None:
    assert [round_filters(c, 1.1) for c in (32, 16, 24, 40, 80, 112, 192, 320, 1280)] == [
        32, 16, 24, 48, 88, 120, 208, 352, 1408,
    ]  # fmt: skip
    assert [round_filters(32, w) for w in (1.2, 1.4, 1.6)] == [40, 48, 48]
    assert round_filters(1280, 1.6) == 2048 and round_filters(3, 1.0) == 8
    assert [round_repeats(r, 2.2) for r in (1, 2, 3, 4)] == [3, 5, 7, 9]
    assert [conv_groups(c, 16) for c in (32, 40, 48, 56, 96)] == [2, 2, 3, 2, 6]
    assert conv_groups(96, 1) == 96 and conv_groups(8, 16) == 1
    with pytest.raises(ValueError, match="group_size"):
        conv_groups(16, 0)


def test_depth_scaling_and_residual_blocks() -> None:
    with torch.device("meta"):
        b5 = normfree.create_model("efficientnet_b5_g1_bn")
    assert [len(s) for s in b5.stages] == [3, 5, 5, 7, 7, 9, 3]
    model = normfree.create_model("efficientnet_b0_g1_bn")
    assert [len(s) for s in model.stages] == [1, 2, 2, 3, 3, 4, 1]
    residual = [b for _, b in model.residual_blocks()]
    plain = [m for m in model.modules() if isinstance(m, MBConv)]
    assert len(residual) == 9 and len(plain) == 7  # first block of each stage has no residual
    assert all(isinstance(b, ResidualMBConv) for b in residual)
    assert not any(isinstance(b, ResidualBlock) for b in plain)
    rates = [b.drop_path.drop_rate for b in residual]
    flat = [b for s in model.stages for b in s]
    assert rates == pytest.approx([0.2 * flat.index(b) / 16 for b in residual])
    assert all(b.drop_path.scale_by_keep for b in residual)


def test_branch_probe_sees_the_branch_before_drop_connect() -> None:
    torch.manual_seed(0)
    model = normfree.create_model("efficientnet_b0_g16_gn").train()
    block = model.stages[1][1]
    assert block.drop_path.drop_rate == pytest.approx(0.2 * 2 / 16)
    block.drop_path.drop_rate = 0.5
    seen = []
    block.branch_probe.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(16, 24, 8, 8)
    with torch.no_grad():
        out = block(x)
        branch = block._branch(x)
    torch.testing.assert_close(seen[0], branch, rtol=0, atol=0)
    kept = [torch.allclose(out[i], x[i] + branch[i] / 0.5, atol=1e-5) for i in range(16)]
    dropped = [torch.equal(out[i], x[i]) for i in range(16)]  # kept ones are rescaled by 1/keep
    assert all(k != d for k, d in zip(kept, dropped)) and any(dropped) and any(kept)


def test_feature_info_matches_intermediates() -> None:
    model = normfree.create_model("efficientnet_b0_g16_gn").eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert [f.shape[1] for f in feats] == [i.num_chs for i in model.feature_info]
    assert [64 // f.shape[-1] for f in feats] == [i.reduction for i in model.feature_info]
    assert [i.reduction for i in model.feature_info] == [2, 2, 4, 8, 16, 16, 32, 32]
    assert (
        model.num_features == 1280
        and model.forward_features(torch.randn(1, 3, 32, 32)).shape[1] == 1280
    )


def test_group_conv_variant() -> None:
    g16 = normfree.create_model("efficientnet_b0_g16_bn")
    g1 = normfree.create_model("efficientnet_b0_g1_bn")
    for conv in _kxk_convs(g16):
        assert conv.in_channels // conv.groups == 16
    assert all(c.groups == c.in_channels for c in _kxk_convs(g1))
    # expand ratio 4 (G16) vs 6 (G1); the first stage keeps 1 (no expand conv)
    assert g16.stages[1][0].expand_conv.out_channels == 16 * 4
    assert g1.stages[1][0].expand_conv.out_channels == 16 * 6
    assert g16.stages[0][0].expand_conv is None
    with torch.device("meta"):
        b3 = normfree.create_model("efficientnet_b3_g16_gn")
    assert b3.stages[0][0].dw_conv.groups == 2  # 40 channels: 2 groups of 20


def test_init_is_he_fan_in_for_group_convs_and_fan_out_for_1x1() -> None:
    torch.manual_seed(0)
    model = normfree.create_model("efficientnet_b0_g16_gn")
    dw = model.stages[5][1].dw_conv  # 5×5, 1152 channels, groups of 16
    assert dw.weight.std().item() == pytest.approx(math.sqrt(2 / (16 * 25)), rel=0.02)
    pw = model.stages[5][1].project_conv  # 1×1, 768 → 192
    assert pw.weight.std().item() == pytest.approx(math.sqrt(2 / 192), rel=0.02)
    se = model.stages[5][1].se
    assert se.fc1.weight.std().item() == pytest.approx(math.sqrt(2 / se.fc1.out_channels), rel=0.1)
    assert torch.equal(se.fc1.bias, torch.zeros_like(se.fc1.bias))
    assert se.gate_gain == 1.0 and isinstance(se.act, nn.SiLU)


def test_norm_variants_layout() -> None:
    bn = normfree.create_model("efficientnet_b0_g1_bn")
    bns = [m for m in bn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 49 and all(m.eps == 1e-3 and m.momentum == 0.01 and m.affine for m in bns)
    gn = normfree.create_model("efficientnet_b0_g16_gn")
    gns = [m for m in gn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 49 and all(m.num_groups == 4 and m.affine for m in gns)
    assert not any(isinstance(m, ProxyNormActivation) for m in gn.modules())


def test_lnpn_layout() -> None:
    model = normfree.create_model("efficientnet_b0_g16_lnpn")
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 49 and all(m.num_groups == 1 and not m.affine for m in norms)
    pn = [m for m in model.modules() if isinstance(m, ProxyNormActivation)]
    assert len(pn) == 1 + 1 + 15 * 2 + 1  # stem, stage-1 dw, expand+dw of 15 blocks, head
    assert all(isinstance(m.act, nn.SiLU) and m.eps == 0.03 for m in pn)
    assert isinstance(model.final.norm_act.act, ProxyNormActivation)
    assert not model.final.norm_act.act.scale
    block = model.stages[2][1]
    assert isinstance(block.dw_norm, NormAct) and isinstance(block.dw_norm.act, ProxyNormActivation)
    assert isinstance(block.se.act, nn.SiLU)  # SE-internal activation is not proxy-normalized
    proj = dict(block.project_norm.named_parameters())
    assert list(proj) == ["weight"]  # the projection norm keeps its scale, no shift
    x = torch.randn(2, 40, 4, 4)
    with torch.no_grad():
        expected = nn.functional.group_norm(x, 1, eps=1e-3) * proj["weight"].view(1, -1, 1, 1)
        torch.testing.assert_close(block.project_norm(x), expected)


def test_lnpn_weight_decay_declarations_and_folding() -> None:
    torch.manual_seed(0)
    model = normfree.create_model("efficientnet_b0_g16_lnpn", num_classes=5)
    no_decay = model.no_weight_decay_names()
    proxy = {n for n, _ in model.named_parameters() if ".proxy_" in n}
    assert len(proxy) == 2 * 33 and not proxy & no_decay
    assert "stem.norm_act.act.weight" in no_decay and "stages.2.1.project_norm.weight" in no_decay
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".act." in n and "se." not in n:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    folded = fold_proxy_norm(model).eval()
    assert sum(isinstance(m, FoldedProxyNormActivation) for m in folded.modules()) == 33
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", B0)
def test_batch_independence(name: str, batch_gap: Callable[..., float]) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=10, drop_rate=0.0, stochdepth_rate=0.0)
    x = torch.randn(4, 3, 64, 64)  # 2×2 final maps: BN can run on a single training example
    train_diff = batch_gap(model.train(), x)
    assert batch_gap(model.eval(), x) <= 1e-5
    if name.endswith("_bn"):
        assert train_diff > 1e-3  # batch statistics
    else:
        assert train_diff < 1e-5


@pytest.mark.parametrize("name", B0)
def test_trains_a_few_steps(name: str, fit_steps: Callable[..., list[float]]) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=4, drop_rate=0.0, stochdepth_rate=0.0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    losses = fit_steps(model, x, y, opt, 5)
    # the loss falls (not step by step: with momentum and batch statistics it may rise once)
    assert losses[-1] < 0.9 * losses[0] and sum(losses[-2:]) < sum(losses[:2]), losses


@pytest.mark.slow
@pytest.mark.parametrize("size", ["b1", "b2", "b3", "b4", "b5"])
def test_larger_sizes_take_a_training_step(
    size: str, fit_steps: Callable[..., list[float]]
) -> None:
    """One model per size (the variants share B0's code paths): a few small steps lower the
    loss (the normalized stem has large scale-invariant gradients at init, hence the tiny lr)."""
    torch.manual_seed(0)
    name = f"efficientnet_{size}_g16_lnpn"
    model = normfree.create_model(name, num_classes=4, drop_rate=0.0, stochdepth_rate=0.0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    losses = fit_steps(model, x, y, opt, 3)
    assert losses[-1] < losses[0] and losses[1] < losses[0], losses


def test_option_errors() -> None:
    with pytest.raises(ValueError, match="norm"):
        EfficientNet(norm="layer")
    with pytest.raises(ValueError, match="width"):
        EfficientNet(width=0.0)
    with pytest.raises(ValueError, match="se_ratio"):
        EfficientNet(se_ratio=2.0)
    with pytest.raises(TypeError):
        normfree.create_model("efficientnet_b0_g1_bn", not_an_option=1)
