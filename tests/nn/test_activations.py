"""γ-scaled activations: the official table, the quadrature γ and the scaled modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normfree.nn.activations import (
    GAMMA_TABLE,
    ScaledActivation,
    activation_gamma,
    activation_names,
    get_activation,
    nf_activation,
)

OFFICIAL_NAMES = {
    "relu", "gelu", "silu", "elu", "celu", "selu", "relu6", "leaky_relu", "tanh", "sigmoid",
    "softplus", "soft_sign", "log_sigmoid", "log_softmax", "glu", "identity",
}  # fmt: skip


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _normal_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def test_table_is_the_official_one_verbatim() -> None:
    assert set(GAMMA_TABLE) == OFFICIAL_NAMES
    assert GAMMA_TABLE["relu"] == 1.7139588594436646
    assert GAMMA_TABLE["gelu"] == 1.7015043497085571
    assert GAMMA_TABLE["silu"] == 1.7881293296813965
    assert GAMMA_TABLE["glu"] == 1.8484294414520264
    assert GAMMA_TABLE["identity"] == 1.0
    assert OFFICIAL_NAMES | {"gelu_exact"} == set(activation_names())


def test_relu_gamma_is_exact() -> None:
    exact = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
    assert abs(activation_gamma("relu") - exact) < 1e-7
    assert abs(activation_gamma(torch.relu) - exact) < 1e-7


def test_closed_forms() -> None:
    # Leaky ReLU with slope a: E[φ] = (1-a)/√(2π), E[φ²] = (1+a²)/2.
    a = 0.01
    var = (1 + a * a) / 2 - ((1 - a) / math.sqrt(2 * math.pi)) ** 2
    assert abs(activation_gamma("leaky_relu") - var**-0.5) < 1e-10
    # SELU's constants make (mean 0, variance 1) the fixed point for N(0,1) input.
    assert abs(activation_gamma("selu") - 1.0) < 1e-9
    assert activation_gamma("identity") == pytest.approx(1.0, abs=1e-12)
    # ELU and CELU (α = 1) are the same function.
    assert activation_gamma("elu") == pytest.approx(activation_gamma("celu"), rel=1e-14)


@pytest.mark.parametrize("name", sorted(OFFICIAL_NAMES))
def test_table_within_2e3_of_quadrature(name: str) -> None:
    # The table holds Monte-Carlo estimates; relative difference <= 2e-3 (glu: 1.2e-3, the most).
    assert abs(GAMMA_TABLE[name] / activation_gamma(name) - 1.0) <= 2e-3


@pytest.mark.parametrize("name", ["relu", "gelu", "tanh", "silu", "sigmoid"])
def test_quadrature_matches_monte_carlo(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2_000_000, generator=gen, dtype=torch.float64)
    mc_var = get_activation(name)(x).var().item()
    # Relative standard error of a variance estimate on 2e6 samples is < 2e-3 for these φ;
    # 6e-3 is three of those.
    assert activation_gamma(name) ** -2 == pytest.approx(mc_var, rel=6e-3)


def test_glu_gamma_matches_monte_carlo_on_channel_halves() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2_000_000, 2, generator=gen, dtype=torch.float64)  # (N, C=2): a | b
    y = get_activation("glu")(x)
    assert y.shape == (2_000_000, 1)
    assert activation_gamma("glu") ** -2 == pytest.approx(y.var().item(), rel=6e-3)


def test_breakpoints_for_custom_kinks() -> None:
    c = 0.3  # φ(x) = max(x, c); closed form from the truncated normal moments
    m1 = c * _normal_cdf(c) + _normal_pdf(c)
    m2 = c * c * _normal_cdf(c) + (1 - _normal_cdf(c)) + c * _normal_pdf(c)
    exact = (m2 - m1 * m1) ** -0.5

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=c)

    assert abs(activation_gamma(fn, breakpoints=[c]) - exact) < 1e-10
    assert abs(activation_gamma(fn) - exact) < 1e-4  # a kink inside a panel: still close


@pytest.mark.parametrize("gamma", ["table", "exact"])
@pytest.mark.parametrize(
    "name", ["relu", "gelu", "gelu_exact", "silu", "elu", "tanh", "sigmoid", "softplus"]
)
def test_scaled_activation_has_unit_variance(name: str, gamma: str) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(400_000, generator=gen)
    y = nf_activation(name, gamma=gamma)(x)
    # Sampling error of the variance ≈ 3e-3 here; the table γ adds at most 4e-3.
    assert y.var().item() == pytest.approx(1.0, abs=1.5e-2)


def test_channel_activations_have_unit_variance() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 256, generator=gen)
    for name in ("glu", "log_softmax"):
        y = nf_activation(name, gamma="exact")(x)
        assert y.var(dim=0).mean().item() == pytest.approx(1.0, abs=2e-2), name
    assert nf_activation("glu")(x).shape == (2000, 128)


def test_forward_is_gamma_times_activation() -> None:
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(
        nf_activation("silu")(x), GAMMA_TABLE["silu"] * F.silu(x), rtol=0, atol=0
    )
    torch.testing.assert_close(  # eager CPU tanh-GELU: the sigmoid form (test_tanh_gelu.py)
        nf_activation("gelu")(x),
        GAMMA_TABLE["gelu"] * F.gelu(x, approximate="tanh"),
        rtol=2e-6,
        atol=2e-6,
    )
    torch.testing.assert_close(
        nf_activation("leaky_relu")(x), GAMMA_TABLE["leaky_relu"] * F.leaky_relu(x, 0.01)
    )
    m = nf_activation("relu", gamma=2.5)
    assert isinstance(m, ScaledActivation) and m.gamma == 2.5 and m.name == "relu"
    assert "gamma=2.5" in repr(m)


def test_gelu_variants() -> None:
    assert nf_activation("gelu").act.approximate == "tanh"
    assert nf_activation("gelu_exact").act.approximate == "none"
    # Not in the official table: "table" falls back to the quadrature value.
    assert nf_activation("gelu_exact").gamma == activation_gamma("gelu_exact")


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match=r"known activations: .*relu"):
        nf_activation("swishy")
    with pytest.raises(ValueError, match="gamma"):
        nf_activation("relu", gamma="tabel")
    with pytest.raises(ValueError, match="positive"):
        nf_activation("relu", gamma=-1.0)
    with pytest.raises(TypeError):
        nf_activation("relu", gamma=True)
    with pytest.raises(ValueError, match="elementwise"):
        activation_gamma(nn.GLU(dim=0))
    with pytest.raises(TypeError):
        activation_gamma(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="zero variance"):
        activation_gamma(lambda x: torch.zeros_like(x))


def test_inplace() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    ref = nf_activation("relu")
    out_ref = ref(x)
    out_ref.sum().backward()
    grad_ref = x.grad.clone()
    x.grad = None
    act = nf_activation("relu", inplace=True)
    h = x * 1.0  # in-place on a non-leaf
    out = act(h)
    out.sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grad_ref, rtol=0, atol=0)
    with torch.no_grad():
        z = torch.randn(4, 8)
        expected = GAMMA_TABLE["relu"] * torch.relu(z)
        assert act(z) is z  # fully in place without autograd
        torch.testing.assert_close(z, expected, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", ["relu", "gelu", "glu", "log_softmax", "identity"])
def test_torchscript(name: str) -> None:
    module = nf_activation(name)
    scripted = torch.jit.script(module)
    x = torch.randn(2, 4, 3, 3)
    # eager CPU tanh-GELU takes the sigmoid form, TorchScript the native kernel: ≤ a few ulps
    tol = 2e-6 if name == "gelu" else 0.0
    torch.testing.assert_close(scripted(x), module(x), rtol=tol, atol=tol)


def test_onnx_export() -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    module = nf_activation("gelu").eval()
    x = torch.randn(2, 4, 3, 3)
    program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
    model = program.model_proto
    onnx.checker.check_model(model)
    out = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), module(x), rtol=1e-5, atol=1e-6)
