"""Fixup ResNets (Zhang et al. 2019): init rules, zero branches and logits at init, scalar
learning rates, batch independence, shortcuts, training and depth."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import normfree
from normfree.models.fixup import FixupBlock, FixupResNet
from normfree.nn import (
    ScalarBias,
    ScalarMultiplier,
    ZeroPadShortcut,
    fixup_init_branch_,
    fixup_lr_scale,
    fixup_scale_factor,
)
from normfree.optim import build_param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _he_fan_out_std(w: torch.Tensor) -> float:
    return math.sqrt(2.0 / (w.shape[0] * w.shape[2] * w.shape[3]))


def test_scale_factor_values() -> None:
    assert fixup_scale_factor(16, 3) == 0.5  # ResNet-50: 16^-1/4
    assert fixup_scale_factor(33, 3) == pytest.approx(0.417, abs=5e-4)  # ResNet-101
    assert fixup_scale_factor(54, 2) == pytest.approx(0.1361, abs=1e-4)  # small ResNet-110
    assert fixup_scale_factor(54, 2) == pytest.approx(1 / math.sqrt(54), rel=1e-15)
    with pytest.raises(ValueError, match="layers_per_branch"):
        fixup_scale_factor(10, 1)
    with pytest.raises(ValueError, match="num_branches"):
        fixup_scale_factor(0, 2)
    with pytest.raises(ValueError, match="2 weight layers"):
        fixup_init_branch_([torch.empty(4, 4, 1, 1)], 3)


@pytest.mark.parametrize(
    ("name", "num_blocks", "factor"),
    [
        ("fixup_resnet50", 16, 0.5),
        ("fixup_resnet101", 33, 33**-0.25),
        ("fixup_resnet_cifar110", 54, 54**-0.5),
    ],
)
def test_init_rule_per_depth(name: str, num_blocks: int, factor: float) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=10)
    blocks = [b for _, b in model.residual_blocks()]
    assert len(blocks) == model.num_branches == num_blocks
    assert model.fixup_scale_factor() == pytest.approx(factor, rel=1e-12)
    z_scaled, z_shortcut = [], []
    for block in blocks:
        *scaled, last = block.branch_weights()
        assert torch.count_nonzero(last) == 0  # last layer of every branch is exactly 0
        for w in scaled:
            z = w / (_he_fan_out_std(w) * factor)  # should be ~N(0, 1)
            # per layer (≥ 2304 weights): std within 8% (> 5 standard errors)
            assert z.std().item() == pytest.approx(1.0, rel=0.08), (name, tuple(w.shape))
            z_scaled.append(z.flatten())
        if isinstance(block.downsample, nn.Conv2d):  # shortcut: plain He fan-out, not rescaled
            w = block.downsample.weight
            z_shortcut.append((w / _he_fan_out_std(w)).flatten())
    # pooled over the network: within 1% (≥ 10^5 samples, standard error < 0.3%)
    assert torch.cat(z_scaled).std().item() == pytest.approx(1.0, rel=0.01)
    assert torch.cat(z_scaled).mean().abs().item() < 0.01
    if z_shortcut:
        assert torch.cat(z_shortcut).std().item() == pytest.approx(1.0, rel=0.02)
    fc = model.get_classifier()
    assert torch.count_nonzero(fc.weight) == 0 and torch.count_nonzero(fc.bias) == 0


def test_scalars_and_official_names() -> None:
    model = normfree.create_model("fixup_resnet50")
    keys = set(model.state_dict())
    block_scalars = ("bias1a", "bias1b", "bias2a", "bias2b", "bias3a", "bias3b")
    for b in block_scalars:
        assert f"stages.0.0.{b}.bias" in keys
    assert {"stages.0.0.scale.scale", "stem.bias.bias", "final.bias"} <= keys
    biases = [m for m in model.modules() if isinstance(m, ScalarBias)]
    scales = [m for m in model.modules() if isinstance(m, ScalarMultiplier)]
    assert len(biases) == 16 * 6 + 2 and len(scales) == 16
    assert all(m.bias.shape == () and m.bias.item() == 0.0 for m in biases)
    assert all(m.scale.item() == 1.0 for m in scales)
    assert all(c.bias is None for c in model.modules() if isinstance(c, nn.Conv2d))
    assert model.meta.recipe == {"scalar_lr_scale": 0.1, "agc": False}
    assert not model.meta.uses_batch_stats


@pytest.mark.parametrize("name", ["fixup_resnet_cifar20", "fixup_resnet50"])
def test_branches_and_logits_are_exactly_zero_at_init(name: str) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=10)
    probes, checks = [], []

    def block_hook(block: FixupBlock, inputs: tuple[torch.Tensor], out: torch.Tensor) -> None:
        x = inputs[0]
        shortcut = block.downsample(x) if block.downsample is not None else x
        checks.append(torch.equal(out, torch.relu(shortcut)))  # block = relu(shortcut(x))

    for _, block in model.residual_blocks():
        block.branch_probe.register_forward_hook(lambda m, i, o: probes.append(o))
        block.register_forward_hook(block_hook)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
    assert len(probes) == len(checks) == model.num_branches
    assert all(torch.count_nonzero(p) == 0 for p in probes)
    assert all(checks)
    assert torch.count_nonzero(logits) == 0
    loss = nn.functional.cross_entropy(logits, torch.tensor([3, 7]))
    assert loss.item() == pytest.approx(math.log(10), rel=1e-6)


def test_lr_scale_exactly_on_scalars_and_param_groups() -> None:
    model = normfree.create_model("fixup_resnet_cifar20", num_classes=10)
    scalar_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, (ScalarBias, ScalarMultiplier))
        for p in m.parameters()
    }
    assert len(scalar_ids) == 9 * 5 + 2  # bias1a,1b,2a,2b + scale per block; stem and head bias
    for name, p in model.named_parameters():
        assert model.lr_scale(name) == (0.1 if id(p) in scalar_ids else 1.0), name
    assert model.lr_scale("head.fc.bias") == 1.0  # unlike the official 'bias' in name rule

    groups = build_param_groups(model, lr=0.2, weight_decay=1e-4, clipping=None)
    by_scale = {g["lr_scale"]: g for g in groups}
    assert set(by_scale) == {0.1, 1.0} and len(groups) == 2
    assert by_scale[0.1]["lr"] == pytest.approx(0.02) and by_scale[1.0]["lr"] == 0.2
    assert {id(p) for p in by_scale[0.1]["params"]} == scalar_ids
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 1e-4 for g in groups)  # official: decay on everything
    torch.optim.SGD(groups, lr=0.2, momentum=0.9)  # accepted by torch optimizers

    no_decay = normfree.create_model("fixup_resnet_cifar20", decay_scalars=False)
    groups = build_param_groups(no_decay, lr=0.2, weight_decay=1e-4, clipping=None)
    for g in groups:
        assert all((p.ndim <= 1) == (g["weight_decay"] == 0.0) for p in g["params"])
    # a plain module: lr scales from the module types
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), ScalarBias(), ScalarMultiplier())
    groups = build_param_groups(
        plain, lr=1.0, weight_decay=0.0, clipping=None, lr_scale=fixup_lr_scale(plain)
    )
    assert {g["lr_scale"]: g["param_names"] for g in groups} == {
        1.0: ["0.weight", "0.bias"],
        0.1: ["1.bias", "2.scale"],
    }
    with pytest.raises(ValueError, match="lr"):
        build_param_groups(model, lr=0.0, weight_decay=0.0)


def test_reset_parameters_restores_fixup_init() -> None:
    torch.manual_seed(0)
    model = normfree.create_model("fixup_resnet_cifar20")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.reset_parameters()
    for _, block in model.residual_blocks():
        assert torch.count_nonzero(block.branch_weights()[-1]) == 0
        assert block.scale.scale.item() == 1.0 and block.bias1a.bias.item() == 0.0
    assert torch.count_nonzero(model.get_classifier().weight) == 0


def _perturb(model: nn.Module) -> None:
    """Random values everywhere, so the network computes a non-trivial function."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 4:
                p.copy_(torch.randn_like(p) * _he_fan_out_std(p) * 0.5)
            else:
                p.normal_(0.0, 0.1)


def test_batch_independent_in_train_and_eval(batch_gap: Callable[..., float]) -> None:
    torch.manual_seed(0)
    model = normfree.create_model("fixup_resnet_cifar20", num_classes=10)
    _perturb(model)
    x = torch.randn(8, 3, 8, 8)
    for train in (True, False):
        assert batch_gap(model.train(train), x) <= 1e-6


def test_zero_pad_shortcut_matches_official_option_a() -> None:
    torch.manual_seed(0)
    for size in (8, 7):
        x = torch.randn(2, 16, size, size)
        ref = nn.AvgPool2d(1, stride=2)(x)
        ref = torch.cat((ref, torch.zeros_like(ref)), 1)  # the official CIFAR shortcut
        torch.testing.assert_close(ZeroPadShortcut(16, 32, 2)(x), ref, rtol=0, atol=0)
    model = normfree.create_model("fixup_resnet_cifar20", shortcut="zero_pad")
    projection = normfree.create_model("fixup_resnet_cifar20")
    assert isinstance(model.stages[1][0].downsample, ZeroPadShortcut)
    n = sum(p.numel() for p in model.parameters())
    n_proj = sum(p.numel() for p in projection.parameters())
    assert n_proj - n == 16 * 32 + 32 * 64  # the two 1×1 projection convs
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)  # small-image default: 10 classes
    with pytest.raises(ValueError, match="reduce channels"):
        ZeroPadShortcut(32, 16, 1)
    with pytest.raises(ValueError, match="shortcut"):
        normfree.create_model("fixup_resnet_cifar20", shortcut="identity")


def test_trains_a_few_steps_with_param_groups(fit_steps: Callable[..., list[float]]) -> None:
    torch.manual_seed(0)
    model = normfree.create_model("fixup_resnet_cifar20", num_classes=4)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    groups = build_param_groups(model, lr=0.1, weight_decay=0.0, clipping=None)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    losses = fit_steps(model, x, y, opt, 8)
    assert losses[0] == pytest.approx(math.log(4), rel=1e-6)  # zero logits at init
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses


def test_overrides_and_errors() -> None:
    model = normfree.create_model(
        "fixup_resnet_cifar56", num_classes=3, in_chans=1, width=2, drop_rate=0.1,
        stochdepth_rate=0.1,
    )  # fmt: skip
    assert isinstance(model, FixupResNet)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert model.meta.drop_rate == 0.1 and model.meta.name == "fixup_resnet_cifar56"
    assert model.stages[0][0].conv1.out_channels == 32
    with pytest.raises(ValueError, match="width"):
        normfree.create_model("fixup_resnet_cifar20", width=0)
    with pytest.raises(ValueError, match="stem"):
        FixupResNet((1,), (16,), strides=(1,), stem="tiny")


def _deep_forward(name: str, num_blocks: int) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=10)
    assert model.num_branches == num_blocks
    assert model.fixup_scale_factor() == pytest.approx(num_blocks**-0.5)
    w = model.stages[2][-1].conv1.weight
    assert w.std().item() == pytest.approx(_he_fan_out_std(w) * num_blocks**-0.5, rel=0.1)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10) and torch.count_nonzero(out) == 0


@pytest.mark.slow
def test_fixup_1202_layers_builds_and_runs() -> None:
    _deep_forward("fixup_resnet_cifar1202", 600)


@pytest.mark.slow
def test_fixup_10004_layers_builds_and_runs() -> None:
    """161M parameters (~0.65 GB); ~6 s to build and ~1.5 s forward on an idle CPU core."""
    _deep_forward("fixup_resnet_cifar10004", 5001)
