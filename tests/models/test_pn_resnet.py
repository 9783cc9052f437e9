"""GN / LN / GN+PN / LN+PN and ReZero pre-activation ResNets: layout, parameter counts, weight
decay declarations, folding, batch independence, ReZero identity at init, training."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn

import normfree
from normfree.models.resnet import PreActResNet, resnet_family
from normfree.models.skipinit_resnet import SkipInitResNet
from normfree.nn import (
    FoldedProxyNormActivation,
    ProxyNormActivation,
    SkipInitGain,
    WSConv2d,
    fold_proxy_norm,
)

PN_SMALL = ("gnpn_resnet_cifar20", "lnpn_resnet_cifar20")
NORM_SMALL = ("gn_resnet_cifar20", "ln_resnet_cifar20", *PN_SMALL)


pytestmark = pytest.mark.usefixtures("one_thread")


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _resnet50_count(per_channel: int) -> int:
    """Hand count of a pre-activation ResNet-50 with ``per_channel`` parameters per normalized
    channel (BN/GN/LN affine: 2; norm without affine + PN-Act γ, β, γ̃, β̃: 4)."""
    total, cin = 3 * 64 * 49, 64
    for depth, cout in zip((3, 4, 6, 3), (256, 512, 1024, 2048)):
        for _ in range(depth):
            w = cout // 4
            total += per_channel * (cin + 2 * w) + cin * w + 9 * w * w + w * cout
            total += cin * cout if cin != cout else 0
            cin = cout
    return total + per_channel * 2048 + 2048 * 1000 + 1000


def test_registered_names() -> None:
    expected = {
        f"{family}{suffix}"
        for family in ("gn_resnet", "ln_resnet", "gnpn_resnet", "lnpn_resnet")
        for suffix in ("50", "_cifar20", "_cifar56")
    } | {f"rezero_resnet_cifar{d}" for d in (20, 56, 110)}
    assert expected <= set(normfree.list_models())


def test_parameter_counts_match_hand_count() -> None:
    with torch.device("meta"):
        counts = {n: _n_params(normfree.create_model(n)) for n in ("gn_resnet50", "lnpn_resnet50")}
        ln, gnpn = normfree.create_model("ln_resnet50"), normfree.create_model("gnpn_resnet50")
    assert counts["gn_resnet50"] == _n_params(ln) == _resnet50_count(2) == 25_549_352
    assert counts["lnpn_resnet50"] == _n_params(gnpn) == _resnet50_count(4) == 25_594_792


@pytest.mark.parametrize("name", PN_SMALL)
def test_pn_layout(name: str) -> None:
    model = normfree.create_model(name)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 9 * 2 + 1 and not any(n.affine for n in norms)
    if name.startswith("ln"):
        assert all(n.num_groups == 1 for n in norms)  # LayerNorm over (C, H, W)
    else:
        assert {n.num_channels: n.num_groups for n in norms} == {16: 8, 32: 16, 64: 32}
    block = model.stages[1][0]
    for i in (1, 2):  # every norm is followed by a PN-Act with the norm's channels
        act = getattr(block, f"act{i}")
        assert type(act) is ProxyNormActivation
        assert act.num_channels == getattr(block, f"norm{i}").num_channels
        assert act.eps == 0.03 and isinstance(act.act, nn.ReLU)
    pn = [m for m in model.modules() if isinstance(m, ProxyNormActivation)]
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(pn) == 19 and len(relus) == 19  # no ReLU outside a PN-Act
    assert not any(isinstance(m, WSConv2d) for m in model.modules())
    # the "Top": centering only
    assert isinstance(model.final.act, ProxyNormActivation) and not model.final.act.scale
    assert model.meta.family == name.split("_cifar")[0] and model.meta.recipe["agc"] is False
    assert not model.meta.uses_batch_stats


def test_top_activation_subtracts_proxy_mean_only() -> None:
    """At init (β = β̃ = γ̃ = 0, γ = 1) the Top is ``relu(y) − 0.398451`` (the N = 200 midpoint
    quadrature mean of relu on N(0,1)); the full PN-Act also divides by sqrt(0.338035 + 0.03)."""
    model = normfree.create_model("lnpn_resnet_cifar20")
    y = torch.randn(2, 64, 3, 3)
    with torch.no_grad():
        top = model.final.act(y)
        full = model.stages[2][1].act1(y)
    torch.testing.assert_close(top, y.relu() - 0.398451, rtol=0, atol=2e-6)
    torch.testing.assert_close(full, (y.relu() - 0.398451) / (0.338035 + 0.03) ** 0.5,
                               rtol=0, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("name", ("gn_resnet_cifar20", "ln_resnet_cifar20"))
def test_plain_norm_layout(name: str) -> None:
    model = normfree.create_model(name)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 19 and all(n.affine for n in norms)
    assert all(n.num_groups == 1 for n in norms) == name.startswith("ln")
    assert not any(isinstance(m, (WSConv2d, ProxyNormActivation)) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.bias is None for m in convs)
    assert isinstance(model.final.act, nn.ReLU)


@pytest.mark.parametrize("name", PN_SMALL)
def test_proxy_parameters_take_weight_decay(name: str) -> None:
    model = normfree.create_model(name)
    no_decay = model.no_weight_decay_names()
    proxy = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("proxy_")}
    assert len(proxy) == 2 * 19  # γ̃, β̃ of 18 PN-Acts in the blocks + the Top
    assert not proxy & no_decay
    assert {"stages.0.0.act1.weight", "stages.0.0.act1.bias", "final.act.weight"} <= no_decay
    assert "head.fc.bias" in no_decay and "head.fc.weight" not in no_decay
    plain = normfree.create_model("gn_resnet_cifar20")  # no PN: the base rule (ndim ≤ 1)
    assert plain.no_weight_decay_names() == {n for n, p in plain.named_parameters() if p.ndim <= 1}


@pytest.mark.parametrize("name", PN_SMALL)
def test_folded_model_equals_unfolded_in_eval(name: str) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=5)
    with torch.no_grad():  # move every PN parameter away from its init
        for n, p in model.named_parameters():
            if "act" in n:
                p.add_(0.2 * torch.randn_like(p))
    model.eval()
    folded = fold_proxy_norm(model).eval()
    assert not any(isinstance(m, ProxyNormActivation) for m in folded.modules())
    assert sum(isinstance(m, FoldedProxyNormActivation) for m in folded.modules()) == 19
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", (*NORM_SMALL, "rezero_resnet_cifar20"))
def test_batch_independent_in_train_and_eval(name: str, batch_gap: Callable[..., float]) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=10)
    x = torch.randn(4, 3, 8, 8)
    for train in (True, False):
        assert batch_gap(model.train(train), x) <= 1e-5


def test_rezero_is_skipinit_alias_and_branches_are_zero_at_init() -> None:
    torch.manual_seed(0)
    rezero = normfree.create_model("rezero_resnet_cifar20")
    torch.manual_seed(0)
    skipinit = normfree.create_model("skipinit_resnet_cifar20")
    assert rezero.meta.name == "rezero_resnet_cifar20" and rezero.meta.family == "rezero_resnet"
    assert "Bachlechner" in rezero.meta.paper
    torch.testing.assert_close(rezero.state_dict(), skipinit.state_dict(), rtol=0, atol=0)
    blocks = [b for _, b in rezero.residual_blocks()]
    assert len(blocks) == 9 and all(b.skip_gain.gain.item() == 0.0 for b in blocks)
    h = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(blocks[1](h), h)  # x + 0·F(x)
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(rezero(x), skipinit(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ("bn_resnet_cifar20", "lnpn_resnet_cifar20"))
def test_rezero_option_with_a_norm(name: str) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, rezero=True).eval()
    gains = [m for m in model.modules() if isinstance(m, SkipInitGain)]
    assert len(gains) == 9 and all(g.gain.item() == 0.0 for g in gains)
    outputs = []
    for _, b in model.residual_blocks():
        b.skip_gain.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
        assert len(outputs) == 9 and all(torch.equal(o, torch.zeros_like(o)) for o in outputs)
        h = torch.randn(2, 32, 4, 4)
        assert torch.equal(model.stages[1][1](h), h)
    assert resnet_family("bn", rezero=True) == "rezero_bn_resnet"
    assert PreActResNet((1,), (16,), strides=(1,), stem="small", rezero=True).meta.family == (
        "rezero_bn_resnet"
    )


def test_only_the_six_norm_specs_exist() -> None:
    # combinations the papers do not define are not options: no WS/PN/bias flags to combine
    for spec in ("none", "instance", "wsln", "wsgnpn", "bnpn"):
        with pytest.raises(ValueError, match="norm must be one of"):
            PreActResNet((1,), (16,), strides=(1,), stem="small", norm=spec)  # type: ignore[arg-type]
    for flag in ("use_ws", "proxy_norm", "use_biases"):
        with pytest.raises(TypeError, match=flag):
            PreActResNet((1,), (16,), strides=(1,), stem="small", **{flag: True})
    with pytest.raises(TypeError, match="norm"):
        SkipInitResNet((1,), (16,), strides=(1,), stem="small", norm="bn")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="norm_eps"):
        PreActResNet((1,), (16,), strides=(1,), stem="small", norm_eps=0.0)
    wsgn = PreActResNet((1,), (16,), strides=(1,), stem="small", norm="wsgn")
    assert isinstance(wsgn.stem.conv, WSConv2d) and wsgn.meta.family == "wsgn_resnet"


@pytest.mark.parametrize("name", (*NORM_SMALL, "rezero_resnet_cifar20"))
def test_trains_a_few_steps(name: str, fit_steps: Callable[..., list[float]]) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=4)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = fit_steps(model, x, y, opt, 6)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.slow  # four ResNet-50 trainings, ~40 s on one core
@pytest.mark.parametrize("name", ("gn_resnet50", "ln_resnet50", "gnpn_resnet50", "lnpn_resnet50"))
def test_imagenet_models_train_a_few_steps(
    name: str, fit_steps: Callable[..., list[float]]
) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    losses = fit_steps(model, x, y, opt, 5)
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 3, losses
    assert losses[-1] < 0.85 * losses[0], losses
