"""Pre-activation baselines (BN / WS+GN / SkipInit ResNets): counts, topology, batch
(in)dependence, SkipInit identity at init, training smoke tests."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import normfree
from normfree.models.resnet import PreActResNetBlock
from normfree.nn import ScalarBias, WSConv2d, group_norm_groups

SMALL = ("bn_resnet_cifar20", "wsgn_resnet_cifar20", "skipinit_resnet_cifar20")


pytestmark = pytest.mark.usefixtures("one_thread")


def _bottleneck_count(cin: int, cout: int, norm_params: int) -> int:
    """Hand count of one pre-activation bottleneck: 3 norms (2 params per channel for BN/GN,
    ``norm_params`` = 2, or 0 for SkipInit), three bias-free convs and the 1×1 projection."""
    w = cout // 4
    n = norm_params * (cin + w + w) + cin * w + w * w * 9 + w * cout
    return n + (cin * cout if (cin != cout) else 0)


def _resnet50_count(norm_params: int, per_block_extra: int = 0) -> int:
    total = 3 * 64 * 7 * 7  # stem conv, no bias
    cin = 64
    for depth, cout in zip((3, 4, 6, 3), (256, 512, 1024, 2048)):
        for _ in range(depth):
            total += _bottleneck_count(cin, cout, norm_params) + per_block_extra
            cin = cout
    total += norm_params * 2048  # final norm
    return total + 2048 * 1000 + 1000  # classifier


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_bn_resnet50_parameter_count_matches_hand_count() -> None:
    model = normfree.create_model("bn_resnet50")
    expected = _resnet50_count(norm_params=2)
    assert _n_params(model) == expected == 25_549_352
    assert round(expected / 1e6, 2) == 25.55
    # GroupNorm has the same affine parameters as BN; SkipInit drops them and adds one gain/block
    assert _n_params(normfree.create_model("wsgn_resnet50")) == expected
    skipinit = normfree.create_model("skipinit_resnet50")
    assert _n_params(skipinit) == _resnet50_count(norm_params=0, per_block_extra=1)
    # BN running statistics are buffers, not parameters
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn) == 16 * 3 + 1


def _conv_layout(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (tuple(m.weight.shape), m.stride, m.groups)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }


@pytest.mark.parametrize(
    ("reference", "names"),
    [
        ("nf_resnet50", ("bn_resnet50", "wsgn_resnet50", "skipinit_resnet50", "fixup_resnet50")),
        ("nf_resnet_cifar20", (*SMALL, "fixup_resnet_cifar20")),
    ],
)
def test_same_topology_as_nf_resnet(reference: str, names: tuple[str, ...]) -> None:
    ref = normfree.create_model(reference, num_classes=10).eval()
    ref_layout = _conv_layout(ref)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref_shapes = [f.shape for f in ref.forward_intermediates(x, intermediates_only=True)]
    for name in names:
        model = normfree.create_model(name, num_classes=10).eval()
        assert _conv_layout(model) == ref_layout, name  # same convs, names, shapes and strides
        assert model.feature_info == ref.feature_info
        assert [b.is_transition for _, b in model.residual_blocks()] == [
            b.is_transition for _, b in ref.residual_blocks()
        ]
        assert model.num_features == ref.num_features
        with torch.no_grad():
            feats = model.forward_intermediates(x, intermediates_only=True)
            assert [f.shape for f in feats] == ref_shapes


def test_bn_layout_is_bn_relu_conv_with_final_bn_relu() -> None:
    model = normfree.create_model("bn_resnet_cifar20")
    block = model.stages[1][0]
    assert isinstance(block, PreActResNetBlock)
    assert all(isinstance(getattr(block, n), nn.BatchNorm2d) for n in ("norm1", "norm2"))
    assert block.conv1.bias is None and block.conv1.stride == (2, 2)
    assert isinstance(model.final.norm, nn.BatchNorm2d) and isinstance(model.final.act, nn.ReLU)
    # the transition shortcut sees the pre-activated input relu(bn(x))
    x = torch.randn(2, 16, 8, 8)
    block.eval()
    seen = []
    block.downsample.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        block(x)
    torch.testing.assert_close(seen[0], torch.relu(block.norm1(x)), rtol=0, atol=0)
    assert model.meta.uses_batch_stats and model.meta.recipe == {"agc": False}
    assert "stages.0.0.norm1.weight" in model.no_weight_decay_names()


def test_bn_model_is_batch_dependent_in_train_and_independent_in_eval(
    batch_gap: Callable[..., float],
) -> None:
    torch.manual_seed(0)
    model = normfree.create_model("bn_resnet_cifar20", num_classes=10)
    x = torch.randn(8, 3, 8, 8)
    assert batch_gap(model.train(), x) > 1e-3  # the batch statistics differ
    assert batch_gap(model.eval(), x) <= 1e-6


def test_bn_model_converts_to_sync_batchnorm() -> None:
    model = normfree.create_model("bn_resnet_cifar20")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == 9 * 2 + 1


@pytest.mark.parametrize("name", ["wsgn_resnet_cifar20", "skipinit_resnet_cifar20"])
def test_batch_independent_in_train_and_eval(name: str, batch_gap: Callable[..., float]) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=10)
    with torch.no_grad():  # non-trivial SkipInit gains so the blocks do something
        for _, block in model.residual_blocks():
            if block.skip_gain is not None:
                block.skip_gain.gain.fill_(0.5)
    x = torch.randn(8, 3, 8, 8)
    for train in (True, False):
        assert batch_gap(model.train(train), x) <= 1e-6


def test_wsgn_uses_ws_convs_and_group_rule() -> None:
    assert [group_norm_groups(c) for c in (16, 32, 64, 256, 2048)] == [8, 16, 32, 32, 32]
    assert group_norm_groups(48) == 24 and group_norm_groups(3) == 1
    assert group_norm_groups(16, min_channels_per_group=1) == 16
    model = normfree.create_model("wsgn_resnet_cifar20", width=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, WSConv2d) and m.bias is None for m in convs)
    groups = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {32: 16, 64: 32, 128: 32}
    plain = normfree.create_model("wsgn_resnet_cifar20", norm="gn")
    assert not any(isinstance(m, WSConv2d) for m in plain.modules())
    with pytest.raises(ValueError, match="channels"):
        group_norm_groups(0)


def test_skipinit_branches_are_zero_at_init() -> None:
    torch.manual_seed(0)
    model = normfree.create_model("skipinit_resnet_cifar20", num_classes=10)
    blocks = [b for _, b in model.residual_blocks()]
    assert len(blocks) == 9
    assert all(b.skip_gain is not None and b.skip_gain.gain.item() == 0.0 for b in blocks)
    probes, outputs = [], []
    for b in blocks:
        b.branch_probe.register_forward_hook(lambda m, i, o: probes.append(o))
        b.skip_gain.register_forward_hook(lambda m, i, o: outputs.append(o))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    assert all(p.abs().max() > 0 for p in probes)  # the branch computes something …
    assert all(torch.equal(o, torch.zeros_like(o)) for o in outputs)  # … multiplied by g = 0
    # a non-transition block is then exactly the identity
    h = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(blocks[1](h), h)


def test_skipinit_biases_option() -> None:
    model = normfree.create_model("skipinit_resnet_cifar20", use_biases=True, drop_rate=0.2)
    biases = [m for m in model.modules() if isinstance(m, ScalarBias)]
    assert len(biases) == 9 * 2 + 1  # one before every ReLU (norm1, norm2 per block, final)
    assert model.head.drop_rate == 0.2 and model.meta.drop_rate == 0.2
    plain = normfree.create_model("skipinit_resnet_cifar20")
    assert not any(isinstance(m, ScalarBias) for m in plain.modules())


def test_overrides_and_errors() -> None:
    model = normfree.create_model("bn_resnet_cifar56", num_classes=3, in_chans=1, width=2)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert model.stages[2][0].conv1.out_channels == 128
    sd = normfree.create_model("skipinit_resnet_cifar110", stochdepth_rate=0.2)
    rates = [b.drop_path.drop_rate for _, b in sd.residual_blocks()]
    assert rates == pytest.approx([0.2 * i / 54 for i in range(54)])
    assert sd.meta.stochdepth_rate == 0.2 and sd.meta.name == "skipinit_resnet_cifar110"
    with pytest.raises(ValueError, match="width"):
        normfree.create_model("bn_resnet_cifar20", width=0)
    with pytest.raises(ValueError, match="norm"):
        normfree.models.resnet.PreActResNet((1,), (16,), strides=(1,), norm="instance")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="6n"):
        normfree.models.skipinit_resnet.skipinit_resnet_cifar(21)
    with pytest.raises(TypeError):
        normfree.create_model("bn_resnet50", not_an_option=1)


@pytest.mark.parametrize("name", SMALL)
def test_trains_a_few_steps(name: str, fit_steps: Callable[..., list[float]]) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=4)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = fit_steps(model, x, y, opt, 8)
    assert losses[0] == pytest.approx(math.log(4), abs=0.05)  # small logits at init
    assert all(b < a for a, b in itertools.pairwise(losses)), losses  # full batch: monotone
    assert losses[-1] < 0.8 * losses[0], losses


def _deep_forward(name: str, num_blocks: int) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=10)
    assert sum(1 for _ in model.residual_blocks()) == num_blocks
    with torch.no_grad():
        for _, block in model.residual_blocks():
            block.skip_gain.gain.fill_(num_blocks**-0.5)  # ≲ 1/sqrt(d): the paper's small init
        out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.slow
def test_skipinit_1202_layers_builds_and_runs() -> None:
    _deep_forward("skipinit_resnet_cifar1202", 600)  # 6·200 + 2 layers


@pytest.mark.slow
def test_skipinit_10004_layers_builds_and_runs() -> None:
    """161M parameters (~0.65 GB); ~3 s to build and ~1 s forward on an idle CPU core."""
    _deep_forward("skipinit_resnet_cifar10004", 5001)  # 6·1667 + 2 layers


@pytest.mark.parametrize("name", ["bn_resnet_cifar20", "efficientnet_b0_g1_bn"])
def test_grad_checkpointing_updates_batchnorm_statistics_once_per_step(name: str) -> None:
    """``set_grad_checkpointing`` recomputes each block's forward in the backward pass; the
    recomputation must not update BatchNorm's running statistics again (they took two momentum
    updates and ``num_batches_tracked`` counted 2 per step): one training step gives exactly
    the state of the model without checkpointing, gradients included."""
    small = {"depths": (1, 1, 1)} if "cifar" in name else {"width": 0.25, "depth": 0.25}
    torch.manual_seed(0)
    plain = normfree.create_model(name, num_classes=3, **small).train()
    ckpt = normfree.create_model(name, num_classes=3, **small).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 32, 32)
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same stochastic-depth masks
        model(x).square().mean().backward()
    for (key, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), key
    for (key, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=key)
    batches = [m.num_batches_tracked.item() for m in ckpt.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # fmt: skip
    assert batches and set(batches) == {1}


@pytest.mark.parametrize(
    "name", ["nf_resnet_cifar20", "bn_resnet_cifar20", "skipinit_resnet_cifar20",
             "fixup_resnet_cifar20", "msr_resnet_cifar20", "nf_resnet26"],
)  # fmt: skip
def test_an_empty_stage_is_a_clear_error(name: str) -> None:
    """A stage of 0 blocks dropped its stride and channel change while ``feature_info`` still
    announced them (nf_resnet_cifar20 with depths (1, 0, 1): stage 1 said 32 channels at
    reduction 2, the map had 16 at reduction 1); NFNets and NF-RegNets already refused it."""
    depths = (1, 0, 1) if "cifar" in name else (1, 0, 1, 1)
    with pytest.raises(ValueError, match=r"every stage needs at least one block.*\[1, 0, 1"):
        normfree.create_model(name, depths=depths)


def test_compiled_grad_checkpointing_of_a_batchnorm_model() -> None:
    """``torch.compile`` of a BN model with gradient checkpointing trains (Dynamo supports no
    custom checkpoint context, so the compiled path keeps the plain checkpoint, whose
    functional recomputation already updates the running statistics once)."""
    torch.manual_seed(0)
    plain = normfree.create_model("bn_resnet_cifar20", depths=(1, 1, 1), num_classes=3).train()
    ckpt = normfree.create_model("bn_resnet_cifar20", depths=(1, 1, 1), num_classes=3).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 16, 16)
    plain(x).square().mean().backward()
    torch.compile(ckpt, backend="aot_eager")(x).square().mean().backward()  # no slow codegen
    for (key, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)
    for (key, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=key)
