"""Mean Shift Rejection ResNets: zero-mean init, noise placement, train/test graph identity,
batch independence, parameter counts, and training with the MSR optimizer wrapper."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn

import normfree
from normfree.models.msr_resnet import MSRResNet
from normfree.nn import (
    ChannelNoise,
    SkipInitGain,
    ZeroPadShortcut,
    kernel_slice_means,
    zero_mean_conv_weights,
)
from normfree.optim.msr import attach_msr

SMALL = ("msr_resnet_cifar20", "msr_resnet_cifar56", "msr_resnet_cifar110")


pytestmark = pytest.mark.usefixtures("one_thread")


def _max_slice_mean(model: nn.Module) -> float:
    return max(kernel_slice_means(w).abs().max().item() for _, w in zero_mean_conv_weights(model))


def test_registered_with_msr_recipe() -> None:
    assert {*SMALL, "msr_resnet50"} <= set(normfree.list_models("msr_*"))
    model = normfree.create_model("msr_resnet_cifar20")
    assert model.meta.recipe == {"msr": True, "agc": False}
    assert model.meta.family == "msr_resnet" and "Ruff" in model.meta.paper
    assert not model.meta.uses_batch_stats
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())


@pytest.mark.parametrize("magnitude", [1.0, 0.5])
def test_zero_mean_init_of_every_conv(magnitude: float) -> None:
    torch.manual_seed(0)
    model = normfree.create_model("msr_resnet_cifar20", zmi_magnitude=magnitude)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    constrained = zero_mean_conv_weights(model)
    assert len(constrained) == len(convs) == 19  # stem + 2 per block; option A has no conv
    assert _max_slice_mean(model) < 1e-6
    for _, w in constrained:
        norms = w.detach().flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, magnitude), rtol=1e-5, atol=0)
    # ImageNet layout: 1×1 convs are zero-mean over their input channels
    r50 = normfree.create_model("msr_resnet50", num_classes=10)
    assert _max_slice_mean(r50) < 1e-6
    one_by_one = r50.stages[0][0].layer1.conv.weight
    assert one_by_one.shape[2:] == (1, 1)
    assert one_by_one.sum(dim=1).abs().max().item() < 1e-5
    # reset_parameters re-applies the zero-mean init
    with torch.no_grad():
        model.stem.layer.conv.weight.add_(1.0)
    model.reset_parameters()
    assert _max_slice_mean(model) < 1e-6


def test_noise_where_bn_would_be() -> None:
    small = normfree.create_model("msr_resnet_cifar20")
    noise = [m for m in small.modules() if isinstance(m, ChannelNoise)]
    assert len(noise) == 1 + 9 * 2 and all(n.delta == 0.15 and n.shift == 0.0 for n in noise)
    transition = small.stages[1][0]
    assert isinstance(transition.shortcut, ZeroPadShortcut)
    assert transition.layer1.noise is not None and transition.is_transition
    with torch.device("meta"):
        r50 = normfree.create_model("msr_resnet50")
    # one noise layer per BN of torchvision's ResNet-50: stem, 3 per block, 4 projections
    assert sum(isinstance(m, ChannelNoise) for m in r50.modules()) == 1 + 3 * 16 + 4


def test_parameter_counts() -> None:
    model = normfree.create_model("msr_resnet_cifar20")
    # the CIFAR ResNet-20 of He et al. has 269,722 parameters with BN (2 per channel); MSR
    # replaces BN by one bias per channel: 16 + 6·16 + 6·32 + 6·64 = 688 channels fewer
    assert sum(p.numel() for p in model.parameters()) == 269_722 - 688
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        reference = torchvision.models.resnet50()
        ours = normfree.create_model("msr_resnet50")
    bn = sum(m.weight.numel() for m in reference.modules() if isinstance(m, nn.BatchNorm2d))
    total = sum(p.numel() for p in reference.parameters())
    assert sum(p.numel() for p in ours.parameters()) == total - bn == 25_530_472


@pytest.mark.parametrize("name", SMALL)
def test_train_graph_equals_test_graph_without_noise(name: str) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, noise_delta=0.0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    assert torch.equal(train_out, eval_out)


def test_noise_is_training_only() -> None:
    torch.manual_seed(0)
    model = normfree.create_model("msr_resnet_cifar20", noise_delta=0.15, noise_shift=0.1)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model.eval()
        first, second = model(x), model(x)
        model.train()
        noisy = model(x)
    assert torch.equal(first, second)  # eval: deterministic, noise is the identity
    assert (noisy - first).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["msr_resnet_cifar20", "msr_resnet50"])
def test_batch_independent(name: str, batch_gap: Callable[..., float]) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    assert batch_gap(model.eval(), x) <= 1e-5
    quiet = normfree.create_model(name, num_classes=10, noise_delta=0.0).train()
    quiet.load_state_dict(model.state_dict())
    assert batch_gap(quiet, x) <= 1e-5


def test_post_activation_blocks_and_options() -> None:
    torch.manual_seed(0)
    model = normfree.create_model("msr_resnet_cifar20", skipinit=True, use_biases=False).eval()
    gains = [m for m in model.modules() if isinstance(m, SkipInitGain)]
    assert len(gains) == 9 and all(g.gain.item() == 0.0 for g in gains)
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters() if "head" not in n)
    h = torch.randn(2, 16, 8, 8)
    with torch.no_grad():  # zero branch: the block is relu(shortcut(x))
        assert torch.equal(model.stages[0][1](h), h.relu())
        out = model.stages[1][0](h)  # option A: subsample, zero channels appended
        torch.testing.assert_close(out[:, :16], h[:, :, ::2, ::2].relu(), rtol=0, atol=0)
        assert torch.equal(out[:, 16:], torch.zeros_like(out[:, 16:]))
        feats = model.forward_intermediates(torch.randn(2, 3, 8, 8), intermediates_only=True)
    assert all((f >= 0).all() for f in feats)  # every stage ends with a ReLU
    with pytest.raises(ValueError, match="shortcut"):
        MSRResNet((1,), (16,), strides=(1,), shortcut="B")
    with pytest.raises(ValueError, match="delta"):
        normfree.create_model("msr_resnet_cifar20", noise_delta=1.5)
    with pytest.raises(ValueError, match="width"):
        normfree.create_model("msr_resnet_cifar20", width=0)


@pytest.mark.parametrize("name", SMALL)
def test_trains_with_mean_shift_rejection(name: str, fit_steps: Callable[..., list[float]]) -> None:
    """SGD with Mean Shift Rejection attached: the loss falls and every constrained kernel stays on
    the zero-mean isocline; plain SGD drifts off it."""
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=4)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    lr = 0.005 if name.endswith("110") else 0.05  # the deepest net needs a smaller step
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    attach_msr(opt)
    losses = fit_steps(model, x, y, opt, 6)
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 4, losses
    assert losses[-1] < 0.95 * losses[0], losses
    assert _max_slice_mean(model) < 1e-6
    if name == "msr_resnet_cifar20":
        plain = normfree.create_model(name, num_classes=4)
        sgd = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            sgd.zero_grad()
            nn.functional.cross_entropy(plain(x), y).backward()
            sgd.step()
        assert _max_slice_mean(plain) > 1e-4


@pytest.mark.slow  # a ResNet-50 training, ~17 s on one core
def test_resnet50_trains_a_few_steps(fit_steps: Callable[..., list[float]]) -> None:
    torch.manual_seed(0)
    model = normfree.create_model("msr_resnet50", num_classes=4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    attach_msr(opt)
    losses = fit_steps(model, x, y, opt, 5)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert _max_slice_mean(model) < 1e-6
