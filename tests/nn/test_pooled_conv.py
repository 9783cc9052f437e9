"""PooledConv2d, the squeeze-excite 1×1 conv: with the native kernels, the same function as
nn.Conv2d (float64 to rounding, gradcheck), the per-unit norms AGC reads, and the op path
wherever the kernel does not apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normfree
from normfree.nn import PooledConv2d, SqueezeExcite, native
from normfree.nn.pooled_conv import MAX_NATIVE_BATCH
from normfree.nn.unit_norms import unit_grad_norms_from_backward, unit_norm_from_forward


def _pair(in_ch: int, out_ch: int, bias: bool, seed: int = 0) -> tuple[PooledConv2d, nn.Conv2d]:
    torch.manual_seed(seed)
    conv = PooledConv2d(in_ch, out_ch, bias=bias).double()
    ref = nn.Conv2d(in_ch, out_ch, 1, bias=bias).double()
    ref.load_state_dict(conv.state_dict())
    return conv, ref


@pytest.mark.parametrize(
    "batch,in_ch,out_ch,bias",
    [(1, 3, 2, True), (5, 37, 11, True), (8, 64, 16, False), (32, 9, 40, True)],
)
def test_native_equals_conv2d(native_on, batch, in_ch, out_ch, bias) -> None:
    conv, ref = _pair(in_ch, out_ch, bias)
    x = torch.randn(batch, in_ch, 1, 1, dtype=torch.float64)
    up = torch.randn(batch, out_ch, 1, 1, dtype=torch.float64)
    results = []
    for module in (conv, ref):
        xi = x.clone().requires_grad_()
        y = module(xi)
        results.append((y, *torch.autograd.grad(y, (xi, *module.parameters()), up)))
    view = results[0][0].grad_fn  # (B, O) → (B, O, 1, 1)
    assert type(view.next_functions[0][0]).__name__ == "_PooledLinearNativeBackward"
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_native_gradcheck(native_on) -> None:
    conv, _ = _pair(6, 4, True)
    x = torch.randn(3, 6, 1, 1, dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs the weight and bias in place, so conv(x) sees every perturbation
    assert torch.autograd.gradcheck(lambda x, w, b: conv(x), (x, conv.weight, conv.bias))


def test_native_keeps_the_norms_agc_reads(native_on) -> None:
    for dtype, rtol in ((torch.float32, 2e-6), (torch.float64, 1e-13)):
        torch.manual_seed(1)
        se = SqueezeExcite(16, 8).to(dtype)
        with torch.no_grad():
            for p in se.parameters():
                p.add_(0.2)  # non-zero row means: ‖W‖ ≠ ‖W − μ‖
        se(torch.randn(4, 16, 5, 5, dtype=dtype)).square().sum().backward()
        for fc in (se.fc1, se.fc2):
            w = fc.weight
            torch.testing.assert_close(unit_norm_from_forward(w), w.detach().flatten(1).norm(dim=1),
                                       rtol=rtol, atol=0)  # fmt: skip
            (norms,) = unit_grad_norms_from_backward([w], [w.grad])
            torch.testing.assert_close(norms, w.grad.flatten(1).norm(dim=1), rtol=rtol, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_op_path_where_the_kernel_does_not_apply(native_on) -> None:
    conv, _ = _pair(4, 3, True)
    for x in (
        torch.randn(MAX_NATIVE_BATCH + 1, 4, 1, 1, dtype=torch.float64),  # large batch: GEMM
        torch.randn(2, 4, 3, 3, dtype=torch.float64),  # not pooled
    ):
        assert type(conv(x.requires_grad_()).grad_fn).__name__ == "ConvolutionBackward0"
    with native.native_kernels(False):
        y = conv(torch.randn(2, 4, 1, 1, dtype=torch.float64, requires_grad=True))
        assert type(y.grad_fn).__name__ == "ConvolutionBackward0"
    with pytest.raises(RuntimeError):  # nn.Conv2d's own dtype error, not a silent cast
        conv(torch.randn(2, 4, 1, 1, dtype=torch.float32))
    traced = torch.fx.symbolic_trace(SqueezeExcite(4, 2))  # tracing takes the plain conv
    assert "conv2d" in traced.code
    se = SqueezeExcite(4, 2)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(torch.jit.script(se)(x), se(x), rtol=1e-6, atol=1e-7)


def test_an_nf_regnet_training_step_matches_the_op_path(assert_step_matches_the_op_path) -> None:
    # NF-RegNet: squeeze-excite in every block, with the Scaled-WS convs around it
    torch.manual_seed(0)
    model = normfree.create_model(
        "nf_regnet_b0", num_classes=10, drop_rate=0.0, drop_path_rate=0.0
    ).double()
    with torch.no_grad():
        model.get_classifier().weight.normal_(0.0, 0.1)  # zero at init: nothing would flow back
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 7])
    assert_step_matches_the_op_path(model, x, y)
