"""Folded scales of the NF blocks (γ, 1/β, α and the skip gain carried by the conv weights):
outputs and every parameter's gradient equal the plain form's, in float64, for NF-ResNet, NFNet
and NF-RegNet blocks; the eval cache, ``torch.fx`` tracing and the analysis probe still work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normfree.models.nf_regnet import NFRegNetBlock
from normfree.models.nf_resnet import NFResNetBlock
from normfree.models.nfnet import NFNetBlock
from normfree.nn import NFResidualBlock, ScaledStdConv2d, compile_options, plain_forward

BLOCKS = {
    "nf_resnet_bottleneck_transition": lambda: NFResNetBlock(8, 16, 2, 0.9, 0.2),
    "nf_resnet_bottleneck_identity": lambda: NFResNetBlock(16, 16, 1, 0.8, 0.2),
    "nf_resnet_basic_se": lambda: NFResNetBlock(8, 8, 1, 0.7, 0.3, bottleneck=False, use_se=True),
    "nf_resnet_basic_silu": lambda: NFResNetBlock(
        8, 12, 1, 0.95, 0.2, bottleneck=False, activation="silu"
    ),
    "nfnet_transition": lambda: NFNetBlock(8, 16, 2, 0.9, 0.2, group_size=4),
    "nfnet_channels_only": lambda: NFNetBlock(
        8, 16, 1, 0.9, 0.2, group_size=4, use_two_convs=False
    ),
    "nfnet_identity": lambda: NFNetBlock(16, 16, 1, 0.85, 0.2, group_size=4),
    "nf_regnet_transition": lambda: NFRegNetBlock(8, 16, 2, 0.9, 0.2),
    "nf_regnet_identity": lambda: NFRegNetBlock(16, 16, 1, 0.8, 0.2),
}
RTOL, ATOL = 1e-11, 1e-13


def _block(name: str, drop: float = 0.0, skip_gain: float = 0.6) -> NFResidualBlock:
    torch.manual_seed(0)
    block = BLOCKS[name]().double()
    with torch.no_grad():
        for pname, p in block.named_parameters():
            if pname.endswith(("bias", "gain")):  # non-trivial gains, biases and skip gain
                p.copy_(torch.randn_like(p) * 0.3 + 0.8)
        block.skip_gain.gain.fill_(skip_gain)
    block.drop_path.drop_rate = drop
    return block


def _run(block: NFResidualBlock, x: torch.Tensor, upstream: torch.Tensor, fold: bool):
    block.fold_scales = fold
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)  # the same stochastic-depth mask in both forms
    out = block(x)
    out.backward(upstream)
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize(("drop", "skip_gain"), [(0.0, 0.6), (0.4, 0.6), (0.0, 0.0)])
def test_folded_block_matches_plain_outputs_and_every_gradient(
    name: str, drop: float, skip_gain: float
) -> None:
    block = _block(name, drop, skip_gain).train()
    ch = block.conv1.in_channels
    x = torch.randn(4, ch, 9, 9, dtype=torch.float64)
    upstream = torch.randn_like(block(x))
    out_p, gx_p, grads_p = _run(block, x, upstream, fold=False)
    out_f, gx_f, grads_f = _run(block, x, upstream, fold=True)
    torch.testing.assert_close(out_f, out_p, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gx_f, gx_p, rtol=RTOL, atol=ATOL)
    assert grads_f.keys() == grads_p.keys() == dict(block.named_parameters()).keys()
    for pname in grads_p:
        torch.testing.assert_close(grads_f[pname], grads_p[pname], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, n=pname: f"{n}: {m}")  # fmt: skip
    if skip_gain != 0.0:  # the check is not vacuous: the skip gain's gradient is non-zero
        assert grads_p["skip_gain.gain"].abs() > 1e-6


@pytest.mark.parametrize("name", ["nf_resnet_bottleneck_transition", "nfnet_transition",
                                  "nf_regnet_transition"])  # fmt: skip
def test_eval_cache_serves_folded_weights_and_follows_parameter_changes(name: str) -> None:
    block = _block(name).eval()
    x = torch.randn(2, block.conv1.in_channels, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        with plain_forward(block):
            ref = block(x)
        torch.testing.assert_close(block(x), ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(block(x), ref, rtol=RTOL, atol=ATOL)  # from the cache
        block.skip_gain.gain.mul_(-2.0)  # an in-place update of a gain the convs fold in
        with plain_forward(block):
            changed = block(x)
        torch.testing.assert_close(block(x), changed, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(changed, ref)


def test_plain_forward_restores_flags_and_feeds_the_branch_probe() -> None:
    block = _block("nf_resnet_bottleneck_identity")
    block.fold_scales = True
    seen: list[torch.Tensor] = []
    handle = block.branch_probe.register_forward_hook(lambda m, a, o: seen.append(o))
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    block(x)
    assert seen == []  # the folded form never materialises the branch before α·g
    with plain_forward(block):
        block(x)
    handle.remove()
    assert len(seen) == 1 and block.fold_scales is True
    with pytest.raises(RuntimeError), plain_forward(block):
        assert block.fold_scales is False
        raise RuntimeError("body fails")
    assert block.fold_scales is True


def test_blocks_with_plain_convs_fall_back_to_the_plain_form() -> None:
    block = _block("nf_resnet_bottleneck_identity").eval()
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = block(x)
        block.conv2 = block.conv2.to_conv2d()  # e.g. after fold_weight_standardization
        torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-12)


def test_scaled_conv_forward_equals_scaling_the_activations() -> None:
    torch.manual_seed(0)
    conv = ScaledStdConv2d(4, 6, 3, stride=2).double()
    nn.init.normal_(conv.bias)
    g = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    got = conv.forward_scaled(x, 1.3, 0.2, g)
    want = conv(x * 1.3) * 0.2 * g
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    grads = torch.autograd.grad(got.square().sum(), [conv.weight, conv.gain, conv.bias, g])
    refs = torch.autograd.grad(want.square().sum(), [conv.weight, conv.gain, conv.bias, g])
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _ScaledUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = ScaledStdConv2d(4, 6, 3)
        self.g = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv.forward_scaled(x, 1.5, 0.2, self.g)


# stride-1 blocks: the dynamic "SAME" pad of strided convs is not fx-traceable here (issue 14)
@pytest.mark.parametrize("module", [lambda: ScaledStdConv2d(4, 6, 3), lambda: _ScaledUse(),
                                    lambda: _block("nf_resnet_bottleneck_identity").float(),
                                    lambda: _block("nfnet_channels_only").float(),
                                    lambda: _block("nf_regnet_identity").float()])  # fmt: skip
def test_fx_symbolic_trace_equals_eager_and_reads_the_parameters(module) -> None:
    torch.manual_seed(0)
    m = module()
    first = next(c for c in m.modules() if isinstance(c, ScaledStdConv2d))
    x = torch.randn(2, first.in_channels, 8, 8)
    traced = torch.fx.symbolic_trace(m)
    torch.testing.assert_close(traced(x), m(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        first.gain.mul_(2.0)  # the graph reads the parameters, no standardized weight baked in
    torch.testing.assert_close(traced(x), m(x), rtol=1e-5, atol=1e-6)
    traced(x).sum().backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def _tiny_train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fn: nn.Module):
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(fn(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _tiny_models() -> dict[str, tuple[nn.Module, int]]:
    from normfree.models.nf_resnet import NFResNet
    from normfree.models.nfnet import NFNet

    torch.manual_seed(0)
    resnet = NFResNet((1, 1), (8, 16), num_classes=3, stem="small", stem_channels=8,
                      strides=(1, 2), skipinit_init=0.5, stochdepth_rate=0.0, drop_rate=0.0)
    nfnet = NFNet((1, 1), (16, 32), num_classes=3, group_size=8, stem_channels=(4, 8, 8),
                  strides=(1, 2), skipinit_init=0.5, stochdepth_rate=0.0, drop_rate=0.0)
    return {"nf_resnet": (resnet, 8), "nfnet": (nfnet, 16)}  # fmt: skip


@pytest.mark.parametrize("name", ["nf_resnet", pytest.param("nfnet", marks=pytest.mark.slow)])
def test_compiled_train_step_matches_eager_without_graph_breaks(name: str) -> None:
    """Dynamo captures the folded blocks, the custom WS autograd function and the "SAME"
    padding in one graph (``fullgraph=True``); loss and every gradient equal eager's."""
    torch._dynamo.reset()
    model, size = _tiny_models()[name]
    model.train()
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    loss_e, grads_e = _tiny_train_step(model, x, y, model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c, grads_c = _tiny_train_step(model, x, y, compiled)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    for pname, g in grads_e.items():
        torch.testing.assert_close(grads_c[pname], g, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_inductor_compiled_train_step_matches_eager() -> None:
    torch._dynamo.reset()
    model, size = _tiny_models()["nfnet"]
    model.train()
    x, y = torch.randn(2, 3, size + 1, size + 1), torch.tensor([0, 2])  # odd: dynamic "SAME"
    loss_e, grads_e = _tiny_train_step(model, x, y, model)
    # normfree's inductor options (1×1 convs as matrix products), as `normfree train --compile`
    compiled = torch.compile(model, fullgraph=True, options=compile_options("cpu"))
    loss_c, grads_c = _tiny_train_step(model, x, y, compiled)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    for pname, g in grads_e.items():
        torch.testing.assert_close(grads_c[pname], g, rtol=1e-3, atol=1e-5)
