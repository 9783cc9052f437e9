"""PooledConv2d, the squeeze-excite 1×1 conv: on pooled inputs a matrix product that is the
same function as nn.Conv2d (float64 to rounding: output and every gradient), the convolution
itself wherever else, and the same state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normfree
from normfree.nn import PooledConv2d, SqueezeExcite


def _pair(in_ch: int, out_ch: int, bias: bool, seed: int = 0) -> tuple[PooledConv2d, nn.Conv2d]:
    torch.manual_seed(seed)
    conv = PooledConv2d(in_ch, out_ch, bias=bias).double()
    ref = nn.Conv2d(in_ch, out_ch, 1, bias=bias).double()
    ref.load_state_dict(conv.state_dict())  # the same keys and shapes as nn.Conv2d
    return conv, ref


@pytest.mark.parametrize(
    "batch,in_ch,out_ch,bias,size",
    [(1, 3, 2, True, 1), (5, 37, 11, True, 1), (8, 64, 16, False, 1), (2, 6, 4, True, 3)],
)
def test_equals_conv2d(batch, in_ch, out_ch, bias, size) -> None:
    conv, ref = _pair(in_ch, out_ch, bias)
    x = torch.randn(batch, in_ch, size, size, dtype=torch.float64)
    up = torch.randn(batch, out_ch, size, size, dtype=torch.float64)
    results = []
    for module in (conv, ref):
        xi = x.clone().requires_grad_()
        y = module(xi)
        results.append((y, *torch.autograd.grad(y, (xi, *module.parameters()), up)))
    ops = str(results[0][0].grad_fn.next_functions)
    assert ("Addmm" in ops or "Mm" in ops) == (size == 1)  # a matrix product on pooled inputs
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_traced_compiled_and_scripted_forms_are_the_convolution() -> None:
    se = SqueezeExcite(4, 2)
    x = torch.randn(2, 4, 3, 3)
    traced = torch.fx.symbolic_trace(se, concrete_args={"out_gain": None})
    assert "conv2d" in traced.code and "linear" not in traced.code
    torch.testing.assert_close(traced(x), se(x), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.jit.script(se)(x), se(x), rtol=1e-6, atol=1e-7)
    compiled = torch.compile(se.fc1, backend="eager", fullgraph=True)
    pooled = x.mean((2, 3), keepdim=True)
    torch.testing.assert_close(compiled(pooled), se.fc1(pooled), rtol=1e-6, atol=1e-7)


def test_nfnet_squeeze_excite_weights_keep_their_layout() -> None:
    model = normfree.create_model("nfnet_f0", num_classes=10)
    fc = model.get_submodule("stages.0.0.attn_last.fc1")
    assert isinstance(fc, nn.Conv2d) and tuple(fc.weight.shape) == (128, 256, 1, 1)
