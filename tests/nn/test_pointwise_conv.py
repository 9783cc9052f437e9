"""1×1 convolutions in their faster CPU forms (normfree.nn.pointwise_conv): the same function as
the convolution (float64 to rounding: output, every gradient, double backward), each pass in
the form its rule picks (pooled input: F.linear; NCHW float CPU input: per-sample products,
the convolution's input gradient for big weights, one product over the batch's pixels for the
weight gradient of small maps), one custom operator under torch.compile, the convolution under
tracing, TorchScript and export and for channels-last or autocast inputs, and the same state
dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normfree
from compile_backends import direct_export, graphs_seen
from normfree.deploy import prepare_for_inference
from normfree.nn import (
    PointwiseConv2d,
    ScaledStdConv2d,
    SqueezeExcite,
    pointwise_conv2d,
    pointwise_kernels,
)


def _pair(in_ch: int, out_ch: int, bias: bool, seed: int = 0) -> tuple[PointwiseConv2d, nn.Conv2d]:
    torch.manual_seed(seed)
    conv = PointwiseConv2d(in_ch, out_ch, bias=bias).double()
    ref = nn.Conv2d(in_ch, out_ch, 1, bias=bias).double()
    ref.load_state_dict(conv.state_dict())  # the same keys and shapes as nn.Conv2d
    return conv, ref


@pytest.fixture
def products(monkeypatch):
    """The names of the matrix products and convolution backwards run while a test runs (a
    per-sample product with its bias, ``torch.baddbmm``, counts as "bmm")."""
    # inductor registers torch.bmm/mm as extern kernels by __name__ when it is first imported;
    # imported under the patch it would see two functions named "counted" (torch 2.11 raises)
    import torch._inductor.compile_fx

    calls: list[str] = []

    def counting(module, name, label=None):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            calls.append(label or name)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    counting(torch, "bmm")
    counting(torch, "baddbmm", "bmm")
    counting(torch, "mm")
    counting(torch.nn.grad, "conv2d_input")
    return calls


@pytest.mark.parametrize(
    "batch,in_ch,out_ch,bias,size",
    [(1, 3, 2, True, 1), (5, 37, 11, True, 1), (8, 64, 16, False, 1), (2, 6, 4, True, 3)],
)
def test_equals_conv2d_with_gradients(batch, in_ch, out_ch, bias, size) -> None:
    conv, ref = _pair(in_ch, out_ch, bias)
    x = torch.randn(batch, in_ch, size, size, dtype=torch.float64)
    up = torch.randn(batch, out_ch, size, size, dtype=torch.float64)
    results = []
    for module in (conv, ref):
        xi = x.clone().requires_grad_()
        y = module(xi)
        results.append((y, *torch.autograd.grad(y, (xi, *module.parameters()), up)))
    ops = str(results[0][0].grad_fn.next_functions)
    # a matrix product on pooled inputs, the pass-by-pass form on spatial ones
    assert ("Addmm" in ops or "Mm" in ops) == (size == 1)
    assert (results[0][0].grad_fn.name() == "PointwiseConvFunctionBackward") == (size > 1)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# forward / ∂x / ∂W forms: products everywhere; ∂x by the conv (weight > 1 MiB) and ∂W as one
# product over the batch's pixels; the conv forward (weight too big to reread) with both
@pytest.mark.parametrize(
    "in_ch,out_ch,hw,forms",
    [
        (24, 40, (6, 5), ["bmm", "bmm", "bmm"]),
        (512, 1024, (8, 8), ["bmm", "conv2d_input", "mm"]),
        (512, 2048, (2, 2), ["conv2d_input", "mm"]),
    ],
)
def test_training_form_equals_the_convolution_pass_by_pass(
    products, in_ch, out_ch, hw, forms
) -> None:
    conv, ref = _pair(in_ch, out_ch, True)
    x = torch.randn(3, in_ch, *hw, dtype=torch.float64)
    up = torch.randn(3, out_ch, *hw, dtype=torch.float64)
    results = []
    for module in (conv, ref):
        xi = x.clone().requires_grad_()
        y = module(xi)
        results.append((y, *torch.autograd.grad(y, (xi, *module.parameters()), up)))
        if module is conv:
            assert products == forms
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize(
    "batch,in_ch,out_ch,hw",
    [(3, 24, 40, (6, 5)), (3, 512, 1024, (8, 8)), (3, 7, 3, (1, 2)), (0, 6, 5, (3, 3))],
)
def test_every_form_of_every_pass_equals_the_convolution(batch, in_ch, out_ch, hw) -> None:
    # the forms bench_pointwise.py times, whichever the rules pick: each pass in each form
    # gives the convolution's numbers (float64), an empty batch included
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, in_ch, *hw, dtype=torch.float64, generator=gen)
    w = torch.randn(out_ch, in_ch, 1, 1, dtype=torch.float64, generator=gen)
    b = torch.randn(out_ch, dtype=torch.float64, generator=gen)
    up = torch.randn(batch, out_ch, *hw, dtype=torch.float64, generator=gen)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = F.conv2d(xr, wr, br)
    grad_x, grad_w = torch.autograd.grad(y, (xr, wr), up)
    for form in ("product", "conv"):
        torch.testing.assert_close(pointwise_kernels.forward_in(form, x, w, b), y.detach(),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
        torch.testing.assert_close(pointwise_kernels.input_grad_in(form, up, x.shape, w),
                                   grad_x, rtol=1e-12, atol=1e-12)  # fmt: skip
    for form in ("pixels", "samples", "conv"):
        torch.testing.assert_close(pointwise_kernels.weight_grad_in(form, up, x, w), grad_w,
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
    grads = pointwise_kernels.pointwise_backward(up, x, w, True, True, True)
    for got, want in zip(grads, (grad_x, grad_w, up.sum((0, 2, 3)))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_rule_forms_names_the_forms_that_run(products) -> None:
    # 1024·512 float32 = 2 MiB: too big for the cached input-gradient product, small enough to
    # reread per sample at 8²; at 4² its product no longer pays; 24→40 @6×5 is products only
    assert pointwise_kernels.rule_forms(torch.empty(512, 1024, 1, 1), 64) == (
        "product", "conv", "pixels"
    )
    assert pointwise_kernels.rule_forms(torch.empty(2048, 512, 1, 1), 16).forward == "conv"
    assert pointwise_kernels.rule_forms(torch.empty(40, 24, 1, 1), 30) == (
        "product", "product", "samples"
    )
    # the op each form runs (F.conv2d, the conv forward, is not counted by the fixture)
    forward_op = {"product": ["bmm"], "conv": []}
    input_op = {"product": ["bmm"], "conv": ["conv2d_input"]}
    weight_op = {"pixels": ["mm"], "samples": ["bmm"]}
    for in_ch, out_ch, hw in ((24, 40, (6, 5)), (1024, 512, (8, 8))):
        conv = _pair(in_ch, out_ch, True)[0].float()
        x = torch.randn(2, in_ch, *hw, requires_grad=True)
        products.clear()
        conv(x).sum().backward()
        forms = pointwise_kernels.rule_forms(conv.weight, hw[0] * hw[1])
        expected = forward_op[forms.forward] + input_op[forms.input_grad]
        assert products == expected + weight_op[forms.weight_grad]


def test_training_form_has_a_double_backward() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = (torch.randn(s, dtype=torch.float64, generator=gen, requires_grad=True)
            for s in ((2, 3, 4, 3), (5, 3, 1, 1)))  # fmt: skip
    b = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert pointwise_conv2d(x, w, b).grad_fn.name() == "PointwiseConvFunctionBackward"
    assert torch.autograd.gradgradcheck(pointwise_conv2d, (x, w, b))


@pytest.mark.parametrize(
    "batch,in_ch,out_ch,bias,hw",
    [
        (1, 3, 5, True, (7, 9)),
        (4, 64, 256, True, (8, 8)),
        (3, 40, 24, False, (5, 2)),
        (2, 128, 128, True, (2, 2)),
    ],
)
def test_without_autograd_a_per_sample_product_equal_to_the_conv(
    products, batch, in_ch, out_ch, bias, hw
) -> None:
    conv, ref = _pair(in_ch, out_ch, bias)
    x = torch.randn(batch, in_ch, *hw, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x)
    assert products == ["bmm"] and y.is_contiguous()
    torch.testing.assert_close(y, ref(x), rtol=1e-12, atol=1e-12)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), y, rtol=0, atol=0)
    frozen = x.clone()  # autograd on, but nothing needs a gradient (a frozen deployed model)
    conv.requires_grad_(False)
    torch.testing.assert_close(conv(frozen), y, rtol=0, atol=0)
    assert products == ["bmm"] * 3


@pytest.mark.parametrize("bias", [True, False])
def test_training_output_is_its_own_tensor_for_an_in_place_activation(products, bias) -> None:
    # the training form writes the product (and the bias, as baddbmm's addend) into a new
    # tensor, not a view: an in-place ReLU may follow it, and the gradients stay the conv's
    conv, ref = _pair(24, 40, bias)
    x = torch.randn(3, 24, 6, 5, dtype=torch.float64)
    up = torch.randn(3, 40, 6, 5, dtype=torch.float64)
    results = []
    for module in (conv, ref):
        xi = x.clone().requires_grad_()
        y = module(xi)
        if module is conv:
            assert y._base is None and products == ["bmm"]
        out = torch.relu_(y)
        results.append((out, *torch.autograd.grad(out, (xi, *module.parameters()), up)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_rule_is_exact_at_its_boundary(products) -> None:
    # in·out ≤ 16·H·W·(in + out): at 2×2, 128→128 sits on the line, 130→130 is past it
    for channels, expected in ((128, ["bmm"]), (130, [])):
        conv, ref = _pair(channels, channels, True)
        x = torch.randn(2, channels, 2, 2, dtype=torch.float64)
        products.clear()
        with torch.no_grad():
            torch.testing.assert_close(conv(x), ref(x), rtol=1e-12, atol=1e-12)
        assert products == expected


def test_the_convolution_runs_where_the_product_does_not_pay(products) -> None:
    conv, ref = _pair(16, 8, True)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        channels_last = x.contiguous(memory_format=torch.channels_last)
        # the same convolution kernel as nn.Conv2d on the same layout: bit for bit (across
        # layouts oneDNN may sum in another order, e.g. 7e-16 apart on an AMD EPYC host)
        torch.testing.assert_close(conv(channels_last), ref(channels_last), rtol=0, atol=0)
        torch.testing.assert_close(conv(channels_last), ref(x), rtol=1e-12, atol=1e-12)
        single, single_ref = conv.float(), ref.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert single(x.float()).dtype == torch.bfloat16  # the autocast conv's result
            torch.testing.assert_close(single(x.float()), single_ref(x.float()), rtol=0, atol=0)
        wide, wide_ref = _pair(512, 2048, True)  # an NFNet's last stage at 4²: weight too big
        x = torch.randn(2, 512, 4, 4, dtype=torch.float64)
        torch.testing.assert_close(wide(x), wide_ref(x), rtol=1e-12, atol=1e-12)
        half = _pair(16, 8, False)[0].to(torch.bfloat16)
        half(torch.randn(2, 16, 6, 6, dtype=torch.bfloat16))
    assert products == []


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_traced_and_scripted_forms_are_the_convolution_and_compiled_ones_equal_it() -> None:
    se = SqueezeExcite(4, 2)
    x = torch.randn(2, 4, 3, 3)
    traced = torch.fx.symbolic_trace(se, concrete_args={"out_gain": None})
    assert "conv2d" in traced.code and "linear" not in traced.code
    torch.testing.assert_close(traced(x), se(x), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.jit.script(se)(x), se(x), rtol=1e-6, atol=1e-7)
    compiled = torch.compile(se.fc1, backend="eager", fullgraph=True)
    pooled = x.mean((2, 3), keepdim=True)
    torch.testing.assert_close(compiled(pooled), se.fc1(pooled), rtol=1e-6, atol=1e-7)
    conv = PointwiseConv2d(4, 6).eval()
    graph = torch.fx.symbolic_trace(conv)
    assert "conv2d" in graph.code and "bmm" not in graph.code
    with torch.no_grad():
        torch.testing.assert_close(graph(x), conv(x), rtol=1e-6, atol=1e-6)
        compiled = torch.compile(conv, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), conv(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.jit.script(conv)(x), conv(x), rtol=1e-6, atol=1e-6)


def test_functional_form_checks_nothing_the_conv_would_accept_differently() -> None:
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    w = torch.randn(3, 6, 1, 1, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pointwise_conv2d(x, w), F.conv2d(x, w), rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError):
        pointwise_conv2d(x, torch.randn(3, 5, 1, 1, dtype=torch.float64))  # wrong in_channels


def test_scaled_ws_conv_trains_and_evaluates_in_matrix_form(products) -> None:
    torch.manual_seed(0)
    conv = ScaledStdConv2d(24, 40, 1).double()
    assert conv.pointwise and not ScaledStdConv2d(24, 40, 1, stride=2).pointwise
    x = torch.randn(3, 24, 6, 6, dtype=torch.float64)
    expected = F.conv2d(x, conv.standardized_weight(), conv.bias)
    trained = conv(x)
    assert trained.grad_fn.name() == "PointwiseConvFunctionBackward" and products == ["bmm"]
    torch.testing.assert_close(trained, expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), trained, rtol=0, atol=0)  # the same products
    assert products == ["bmm", "bmm"]


def test_model_training_evaluation_and_folded_form_match_the_convolution(products) -> None:
    torch.manual_seed(0)
    model = normfree.create_model("nf_resnet26", num_classes=10, drop_rate=0.0, drop_path_rate=0.0)
    model = model.double()
    for p in model.parameters():  # trained-like skip gains, so that every branch counts
        if p.dim() == 0:
            p.data.fill_(0.3)
    reference = torch.fx.symbolic_trace(model)  # every 1×1 conv traced as F.conv2d
    assert products == []
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    y = torch.tensor([3, 7])
    grads = []
    for net in (model, reference):  # training: loss and every parameter's gradient
        model.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        grads.append([loss] + [p.grad.clone() for p in model.parameters()])
    assert {"bmm", "mm"} <= set(products)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    model.eval()
    with torch.no_grad():
        expected = reference.eval()(x)
        products.clear()
        evaluated = model(x)
        used = len(products)
        folded = prepare_for_inference(model)
        products.clear()
        deployed = folded(x)
    assert used > 0 and len(products) == used
    torch.testing.assert_close(evaluated, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(deployed, expected, rtol=1e-10, atol=1e-10)


def test_folded_pointwise_convs_keep_the_conv_layout() -> None:
    conv = ScaledStdConv2d(8, 4, 1).eval()
    folded = conv.to_conv2d()
    assert type(folded) is PointwiseConv2d and isinstance(folded, nn.Conv2d)
    assert {k: v.shape for k, v in folded.state_dict().items()} == {
        "weight": torch.Size([4, 8, 1, 1]), "bias": torch.Size([4])}  # fmt: skip
    assert type(ScaledStdConv2d(8, 4, 3).to_conv2d()) is nn.Conv2d


def test_nfnet_squeeze_excite_weights_keep_their_layout() -> None:
    model = normfree.create_model("nfnet_f0", num_classes=10)
    fc = model.get_submodule("stages.0.0.attn_last.fc1")
    assert isinstance(fc, nn.Conv2d) and tuple(fc.weight.shape) == (128, 256, 1, 1)


def test_compile_options_lower_1x1_convs_on_cpu_only() -> None:
    options = normfree.nn.compile_options("cpu")
    assert options == {"conv_1x1_as_mm": True, "layout_optimization": False}
    from torch._inductor import config  # the keys must be inductor's, or compile rejects them

    assert all(hasattr(config, key) for key in options)
    assert normfree.nn.compile_options(torch.device("cuda", 0)) == {}


def test_forward_mode_ad_and_torch_func_transforms_match_the_convolution() -> None:
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(1)
    x, tx = (torch.randn(2, 6, 5, 5, dtype=torch.float64, generator=gen) for _ in range(2))
    w = torch.randn(4, 6, 1, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=gen)
    ours = lambda x: pointwise_conv2d(x, w, b)  # noqa: E731
    conv = lambda x: F.conv2d(x, w, b)  # noqa: E731
    for grad_mode in (False, True):  # the product path, and the autograd path falling back
        with torch.set_grad_enabled(grad_mode):
            for a, c in zip(torch.func.jvp(ours, (x,), (tx,)), torch.func.jvp(conv, (x,), (tx,))):
                torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
            with fwAD.dual_level():
                dual = fwAD.make_dual(x, tx)
                torch.testing.assert_close(fwAD.unpack_dual(ours(dual)).tangent,
                                           fwAD.unpack_dual(conv(dual)).tangent,
                                           rtol=1e-12, atol=1e-12)  # fmt: skip
    loss = lambda f: lambda w, xi: f(xi, w, b).square().sum()  # noqa: E731
    per_sample = [torch.func.vmap(torch.func.grad(loss(f)), in_dims=(None, 0))(w, x[:, None])
                  for f in (pointwise_conv2d, F.conv2d)]  # fmt: skip
    torch.testing.assert_close(per_sample[0], per_sample[1], rtol=1e-12, atol=1e-12)


def test_moment_propagation_runs_through_the_product_forms(products, monkeypatch) -> None:
    """Labatie's moments use forward-mode AD under no_grad: the product forms carry the
    tangents and give the convolution's numbers (float32 rounding)."""
    from dataclasses import asdict

    from normfree.analysis import propagate_moments
    from normfree.models.nf_resnet import NFResNet
    from normfree.nn import pointwise_conv

    torch.manual_seed(0)
    model = NFResNet(
        (1, 1), (32, 64), num_classes=3, stem="small", stem_channels=16, strides=(1, 2),
        skipinit_init=0.5, stochdepth_rate=0.0, drop_rate=0.0,
    )  # fmt: skip
    runs = [propagate_moments(model, input_shape=(3, 16, 16), batch_size=4)]
    assert "bmm" in products  # the bottlenecks' 1×1 convs ran as products
    monkeypatch.setattr(pointwise_conv, "_as_matrix_product", lambda *a: None)  # all convs
    runs.append(propagate_moments(model, input_shape=(3, 16, 16), batch_size=4))
    assert len(runs[0].points) == len(runs[1].points) > 2
    for a, c in zip(runs[0].points, runs[1].points):
        a, c = asdict(a), asdict(c)
        for key, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(c[key], rel=1e-3, abs=1e-6), key


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_baseline_and_deployed_models_still_script() -> None:
    x = torch.randn(2, 3, 32, 32)
    for name in ("bn_resnet_cifar20", "fixup_resnet_cifar20"):  # HeConv2d's 1×1 forms
        model = normfree.create_model(name, num_classes=10).eval()
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-5, atol=1e-6)
    folded = prepare_for_inference(normfree.create_model("nf_resnet26", num_classes=10).eval())
    torch.jit.script(folded)  # compiles (baked blocks refuse to run scripted, by design)


def test_modules_pickled_before_the_form_attributes_load() -> None:
    for conv in (ScaledStdConv2d(4, 8, 1), normfree.nn.HeConv2d(4, 8, 1, stride=2)):
        state = conv.__dict__.copy()
        del state["pointwise"], state["strided_pointwise"]  # an older pickle
        old = type(conv).__new__(type(conv))
        old.__setstate__(state)
        assert (old.pointwise, old.strided_pointwise) == (conv.pointwise, conv.strided_pointwise)


def test_the_matrix_forms_can_be_switched_off(products) -> None:
    from normfree.nn import pointwise_matmul, pointwise_matmul_enabled, set_pointwise_matmul

    conv, ref = _pair(16, 8, True)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64, requires_grad=True)
    assert pointwise_matmul_enabled()
    with pointwise_matmul(False):
        assert not pointwise_matmul_enabled()
        y = conv(x)
        torch.testing.assert_close(y, ref(x), rtol=0, atol=0)  # oneDNN's numbers bit for bit
        assert y.grad_fn.name() == "ConvolutionBackward0"
        with torch.no_grad():
            conv(x), conv(x.mean((2, 3), keepdim=True))  # no product, pooled input included
    assert products == [] and pointwise_matmul_enabled()
    with pytest.raises(TypeError, match="bool"):
        set_pointwise_matmul(0)  # type: ignore[arg-type]


@pytest.mark.slow  # three fresh interpreters (~6 s); the in-process switch is tested above
def test_the_environment_switches_the_matrix_forms_off() -> None:
    import os
    import subprocess
    import sys

    code = "import normfree.nn as n; print(n.pointwise_matmul_enabled())"
    for value, expected in (("0", "False"), ("off", "False"), ("1", "True")):
        env = {**os.environ, "NORMFREE_POINTWISE_MATMUL": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        assert out.stdout.strip() == expected


def _compile_sees_exporting() -> bool:
    """Whether this torch's Dynamo folds ``torch.compiler.is_exporting()`` to True in every
    trace (torch 2.11 does; 2.14 does not): a compiled graph then cannot tell torch.compile
    from torch.export, and its 1×1 convs stay convolutions (inductor's ``conv_1x1_as_mm``)."""
    if not hasattr(torch.compiler, "is_exporting"):  # torch < 2.7
        return False
    seen: list[bool] = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.compiler.is_exporting())
        return x + 1

    torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(1))
    return seen[0]


def _compiled_training_graph(bias: bool, size: int, batch: int) -> str:
    """The code of the one graph Dynamo captures for a 1×1 conv (24 → 40, float64) on a
    ``(batch, 24, size, size)`` input with autograd, after checking that the compiled output
    and every gradient equal the convolution's."""
    torch._dynamo.reset()
    conv, ref = _pair(24, 40, bias)
    x = torch.randn(batch, 24, size, size, dtype=torch.float64)
    up = torch.randn(batch, 40, size, size, dtype=torch.float64)
    seen: list[str] = []
    compiled = torch.compile(conv, backend=graphs_seen(seen), fullgraph=True)
    results = []
    for module in (compiled, ref):
        xi = x.clone().requires_grad_()
        y = module(xi)
        results.append((y, *torch.autograd.grad(y, (xi, *module.parameters()), up)))
    assert len(seen) == 1
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    return seen[0]


@pytest.mark.parametrize("size,bias", [(6, True), (3, False)])
def test_compiled_training_runs_the_forms_as_one_operator_with_the_convs_numbers(
    size, bias, products
) -> None:
    """Under torch.compile with autograd a spatial 1×1 conv is ``normfree::pointwise_conv2d``
    (the graph holds no convolution), whose forward and backward run the eager forms and give
    the convolution's numbers (float64)."""
    graph = _compiled_training_graph(bias, size, batch=3)
    if _compile_sees_exporting():  # the convolution, with the same numbers
        assert "normfree" not in graph and graph.count("conv2d(") == 1
    else:
        assert "ops.normfree.pointwise_conv2d" in graph
        assert graph.count("conv2d(") == 1  # that operator, and no convolution
        assert "bmm" in products  # the eager forms ran inside the operator


def test_pointwise_operator_passes_torch_library_opcheck() -> None:
    """The schema, fake (meta) kernel, autograd registration and AOT dispatch of the operator
    agree with its eager kernel (``torch.library.opcheck``)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 6, 1, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.normfree.pointwise_conv2d.default, (x, w, b))
    torch.library.opcheck(torch.ops.normfree.pointwise_conv2d.default, (x, w, None))
    grad = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen)
    torch.library.opcheck(
        torch.ops.normfree.pointwise_conv2d_backward.default,
        (grad, x.detach(), w.detach(), True, False, True),
    )
    # a weight that is a non-contiguous view: the fake gradient is contiguous, as computed
    transposed = torch.randn(6, 4, 1, 1, dtype=torch.float64, generator=gen).transpose(0, 1)
    torch.library.opcheck(
        torch.ops.normfree.pointwise_conv2d_backward.default,
        (grad, x.detach(), transposed, True, True, True),
    )


def test_compiled_evaluation_runs_the_operator_and_export_sees_the_convolution() -> None:
    torch._dynamo.reset()
    conv = PointwiseConv2d(6, 4)
    x = torch.randn(2, 6, 5, 5)
    seen: list[str] = []
    with torch.no_grad():
        out = torch.compile(conv, backend=graphs_seen(seen), fullgraph=True)(x)
        torch.testing.assert_close(out, conv(x), rtol=1e-6, atol=1e-6)
    assert ("ops.normfree.pointwise_conv2d" in seen[0]) != _compile_sees_exporting()
    with direct_export():
        program = torch.export.export(conv, (x,))  # parameters requiring grad, grad on
    code = program.graph_module.code
    assert "conv2d" in code and "normfree" not in code
    with direct_export():
        pooled = torch.export.export(conv, (x.mean((2, 3), True),)).graph_module.code
    assert "conv2d" in pooled and "linear" not in pooled  # export keeps the model's convolution


@pytest.mark.parametrize("bias", [True, False])
def test_compiled_pooled_input_is_a_matrix_product_forward_and_backward(bias) -> None:
    """Under torch.compile a pooled ``(B, C, 1, 1)`` input (the squeeze-excite gates) is
    ``F.linear`` as in eager mode, so its backward is a matrix product too: left a convolution,
    oneDNN's backward of such a 1×1 conv took 73 ms of a compiled NFNet-F0 step
    (docs/benchmarks.md, "Twenty-first pass"). The numbers are the convolution's (float64)."""
    graph = _compiled_training_graph(bias, 1, batch=5)
    if not _compile_sees_exporting():
        assert "linear(" in graph and "conv2d(" not in graph


@pytest.mark.parametrize("size", [8, 1])  # a map, and a pooled (B, C, 1, 1) input
@pytest.mark.parametrize("grad", [True, False])
def test_a_wrong_channel_count_gets_the_convolutions_own_error(size: int, grad: bool) -> None:
    """The matrix forms step aside for an input whose channels do not fit the weight, so the
    error is nn.Conv2d's, naming both shapes (not a failed reshape deep inside a form)."""
    from normfree.nn import HeConv2d, PointwiseConv2d, ScaledStdConv2d, WSConv2d

    convs = [ScaledStdConv2d(3, 4, 1), WSConv2d(3, 4, 1), HeConv2d(3, 4, 1), PointwiseConv2d(3, 4)]
    x = torch.randn(2, 5, size, size)
    for conv in convs:
        with torch.set_grad_enabled(grad), pytest.raises(
            RuntimeError, match=rf"expected input\[2, 5, {size}, {size}\] to have 3 channels"
        ):
            conv(x)
