"""Proxy Normalization (Labatie et al. 2021): quadrature check values, normalisation, gradients,
folding, NormAct blocks and weight-decay declarations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm as normal_dist
from torch import nn

from normfree.nn import plain_forward
from normfree.nn.proxy_norm import (
    FoldedProxyNormActivation,
    NormAct,
    ProxyNormActivation,
    fold_proxy_norm,
    midpoint_normal_quantiles,
    proxy_norm_decay_names,
    proxy_norm_no_decay_names,
)
from normfree.optim.param_groups import build_param_groups

EPS = 0.03
# Check values for N = 200, β = 0, γ = 1, β̃ = γ̃ = 0: the mean and variance of the activation
# over the 200 midpoint quantiles of N(0, 1) that Proxy Normalization averages over.
# Exact ReLU values are 0.398942 and 0.340845; the quadrature is off in the 3rd digit.
CHECK_VALUES = {"relu": (0.398451, 0.338035), "silu": (0.206048, 0.310004)}


def np_act(name: str, x: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    raise KeyError(name)


def reference_moments(
    name: str, gamma: float, beta: float, p_gamma: float, p_beta: float, n: int = 200
) -> tuple[float, float]:
    """Slow float64 reference: scipy's normal quantiles at the midpoints (i+0.5)/n."""
    u = normal_dist.ppf((np.arange(n) + 0.5) / n)
    z = np_act(name, gamma * ((1.0 + p_gamma) * u + p_beta) + beta)
    return float(z.mean()), float(((z - z.mean()) ** 2).mean())


def randomize_(module: ProxyNormActivation, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = module.num_channels
        module.weight.copy_(1.0 + 0.3 * torch.randn(c, generator=g))
        module.bias.copy_(0.3 * torch.randn(c, generator=g))
        module.proxy_weight.copy_(0.2 * torch.randn(c, generator=g))
        module.proxy_bias.copy_(0.2 * torch.randn(c, generator=g))


# --------------------------------------------------------------------------------------------
# Quadrature
# --------------------------------------------------------------------------------------------
def test_quantiles_match_scipy_and_check_values() -> None:
    u = midpoint_normal_quantiles(200, dtype=torch.float64)
    ref = normal_dist.ppf((np.arange(200) + 0.5) / 200)
    np.testing.assert_allclose(u.numpy(), ref, rtol=0, atol=1e-10)
    assert u.min().item() == pytest.approx(-2.8070, abs=5e-5)
    assert u.max().item() == pytest.approx(2.8070, abs=5e-5)
    assert u.var(unbiased=False).item() == pytest.approx(0.993596, abs=1e-6)
    assert abs(u.mean().item()) < 1e-12


def test_quantiles_buffer_is_non_persistent_and_float32() -> None:
    m = ProxyNormActivation(3)
    assert "quantiles" not in m.state_dict()
    assert m.quantiles.dtype == torch.float32 and m.quantiles.shape == (200,)
    assert m.half().quantiles.dtype == torch.float32  # nodes keep fp32 under .half()
    assert m.double().quantiles.dtype == torch.float64
    exact = midpoint_normal_quantiles(200, dtype=torch.float64)
    assert torch.equal(m.quantiles, exact)  # recomputed in float64, not upcast from float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_meta_device_then_to_empty_recomputes_quantiles(dtype: torch.dtype) -> None:
    """``to_empty`` leaves uninitialised memory in every buffer; the non-persistent quadrature
    nodes are neither reset by ``reset_parameters`` nor loaded by ``load_state_dict``, so the
    module must recompute them itself (it gave NaN outputs)."""
    torch.manual_seed(0)
    ref = ProxyNormActivation(4, "silu").to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    with torch.device("meta"):
        m = ProxyNormActivation(4, "silu").to(dtype)
    m.to_empty(device="cpu")
    m.load_state_dict(ref.state_dict())
    assert torch.equal(m.quantiles, ref.quantiles)
    x = torch.randn(2, 4, 3, 3, dtype=dtype)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["relu", "silu"])
def test_proxy_moments_check_values(name: str) -> None:
    mean, var = ProxyNormActivation(4, name).proxy_moments()
    assert mean.dtype == torch.float32
    exp_mean, exp_var = CHECK_VALUES[name]
    torch.testing.assert_close(mean, torch.full((4,), exp_mean), rtol=0, atol=1e-5)
    torch.testing.assert_close(var, torch.full((4,), exp_var), rtol=0, atol=1e-5)
    ref_mean, ref_var = reference_moments(name, 1.0, 0.0, 0.0, 0.0)
    assert mean[0].item() == pytest.approx(ref_mean, abs=1e-6)
    assert var[0].item() == pytest.approx(ref_var, abs=1e-6)


@pytest.mark.parametrize("name", ["relu", "silu"])
def test_proxy_moments_with_learned_parameters(name: str) -> None:
    m = ProxyNormActivation(5, name).double()
    randomize_(m, seed=1)
    mean, var = m.proxy_moments()
    for c in range(5):
        ref = reference_moments(
            name,
            m.weight[c].item(),
            m.bias[c].item(),
            m.proxy_weight[c].item(),
            m.proxy_bias[c].item(),
        )
        assert mean[c].item() == pytest.approx(ref[0], abs=1e-12)
        assert var[c].item() == pytest.approx(ref[1], abs=1e-12)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["relu", "silu", "gelu"])
def test_output_exactly_normalised_on_the_proxy_points(name: str) -> None:
    """Fed the proxy's own points, PN-Act has mean 0 and variance Var/(Var+ε) exactly."""
    m = ProxyNormActivation(3, name).double()
    randomize_(m, seed=2)
    u = midpoint_normal_quantiles(200, dtype=torch.float64)
    y = (1 + m.proxy_weight)[None, :] * u[:, None] + m.proxy_bias[None, :]  # (200, C)
    with torch.no_grad():
        out = m(y)
        _, var = m.proxy_moments()
    torch.testing.assert_close(out.mean(0), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.var(0, unbiased=False), var / (var + EPS), rtol=1e-12, atol=0)


def test_output_on_standard_normal_sample() -> None:
    """On y ~ N(0,1) (2^18 values per channel, seed 0) with default parameters:

    * per-channel mean ≈ 0 and variance ≈ Var_N/(Var_N+ε) within 0.03 (the N = 200 quadrature
      underestimates the ReLU variance by 0.0028, which moves the output variance by 0.008);
    * mean and variance match the exact Gaussian prediction (E_true − E_N)·a and Var_true·a²
      (ReLU closed forms 1/√(2π), 1/2 − 1/(2π)) within 5 sampling standard errors.
    """
    m = ProxyNormActivation(4, "relu")
    y = torch.randn(64, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(y)
        mean_n, var_n = m.proxy_moments()
    ch_mean = out.mean(dim=(0, 2, 3)).double()
    ch_var = out.var(dim=(0, 2, 3), unbiased=False).double()
    target = (var_n / (var_n + EPS)).double()
    assert ch_mean.abs().max().item() < 0.01
    assert (ch_var - target).abs().max().item() < 0.03

    a = (var_n.double() + EPS) ** -0.5
    exact_mean, exact_var = 1 / math.sqrt(2 * math.pi), 0.5 - 1 / (2 * math.pi)
    n = 64 * 64 * 64
    se_mean = math.sqrt(exact_var) * a[0].item() / math.sqrt(n)
    se_var = 2.0 * exact_var * a[0].item() ** 2 / math.sqrt(n)  # generous bound (kurtosis < 4)
    pred_mean = (exact_mean - mean_n.double()) * a
    pred_var = exact_var * a**2
    assert (ch_mean - pred_mean).abs().max().item() < 5 * se_mean
    assert (ch_var - pred_var).abs().max().item() < 5 * se_var


def test_channel_axis_and_input_ranks() -> None:
    m = ProxyNormActivation(3, "silu")
    randomize_(m, seed=3)
    x4 = torch.randn(2, 3, 4, 5)
    out4 = m(x4)
    # (N, C) input: the same per-channel map.
    flat = x4.permute(0, 2, 3, 1).reshape(-1, 3)
    out2 = m(flat)
    torch.testing.assert_close(out2, out4.permute(0, 2, 3, 1).reshape(-1, 3), rtol=0, atol=1e-6)
    assert m(torch.randn(2, 3, 7)).shape == (2, 3, 7)
    with pytest.raises(ValueError, match="channels on axis 1"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="channels on axis 1"):
        m(torch.randn(3))


def test_low_precision_input_keeps_dtype() -> None:
    m = ProxyNormActivation(3, "silu")
    x = torch.randn(2, 3, 4, 4)
    out = m(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), m(x), rtol=0, atol=0.05)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["relu", "silu", "gelu_exact"])
def test_gradcheck_through_proxy_statistics(name: str) -> None:
    m = ProxyNormActivation(3, name).double()
    randomize_(m, seed=4)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    names = ["weight", "bias", "proxy_weight", "proxy_bias"]
    params = tuple(getattr(m, k).detach().clone().requires_grad_(True) for k in names)

    def fn(inp: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(m, dict(zip(names, p)), (inp,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), *params), eps=1e-6, atol=1e-6)


def literal_pn_act(m: ProxyNormActivation, x: torch.Tensor, act) -> torch.Tensor:
    """The paper's formula written out op by op (Labatie et al. 2021, §4): the moments of
    φ(γ·Y + β) over Y = (1 + γ̃)·u + β̃ at the quadrature points, then
    ``(φ(γ·x + β) − E) / sqrt(Var + ε)`` (only ``− E`` without the scale)."""
    u = m.quantiles
    proxy = (1.0 + m.proxy_weight)[:, None] * u + m.proxy_bias[:, None]
    z = act(m.weight[:, None] * proxy + m.bias[:, None])
    mean = z.mean(dim=1)
    var = (z - mean[:, None]).square().mean(dim=1)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = act(x * m.weight.reshape(shape) + m.bias.reshape(shape)) - mean.reshape(shape)
    return out * (var + m.eps).rsqrt().reshape(shape) if m.scale else out


@pytest.mark.parametrize(
    "name,scale,channels_last",
    [("relu", True, False), ("relu", False, False), ("relu", True, True), ("silu", True, False),
     ("gelu", False, False)],
)  # fmt: skip
def test_fast_form_equals_the_literal_formula(name: str, scale: bool, channels_last: bool) -> None:
    """The module's forms (the proxy points as one affine map of u; ReLU moved through the
    output scale) give the literal formula's output and every gradient, in float64."""
    m = ProxyNormActivation(6, name, scale=scale).double()
    randomize_(m, seed=11)
    assert m.relu_form == (name == "relu")
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    up = torch.randn(3, 6, 5, 4, dtype=torch.float64, generator=gen)
    params = list(m.parameters())
    results = []
    for forward in (m, lambda t: literal_pn_act(m, t, m.act)):
        xi = x.clone().requires_grad_()
        out = forward(xi)
        results.append((out, *torch.autograd.grad(out, (xi, *params), up)))
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)


def test_statistics_stay_float32_under_autocast() -> None:
    """Under CPU autocast (bf16) the proxy statistics are the float32 ones: none of their ops
    is one that autocast runs in half precision."""
    m = ProxyNormActivation(8, "relu")
    randomize_(m, seed=15)
    ref = m.proxy_moments()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.proxy_moments()
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_relu_form_follows_the_activation_eps_and_scale() -> None:
    """ReLU moves through the output scale only where that scale is finite and positive, and
    only for an exact ``nn.ReLU``; a module changed after construction finds its form again."""
    import copy
    import pickle

    m = ProxyNormActivation(4, "relu")
    assert m.relu_form
    m.act = nn.GELU()
    assert not m.relu_form
    m.act = nn.ReLU()
    assert m.relu_form
    m.eps = 0.0  # a = rsqrt(Var) may be infinite: the literal order
    assert not m.relu_form
    m.scale = False  # a = 1
    assert m.relu_form

    class ClippedReLU(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).clamp_max(1.0)

    assert not ProxyNormActivation(4, ClippedReLU()).relu_form
    assert copy.deepcopy(m).relu_form and pickle.loads(pickle.dumps(m)).relu_form
    old = ProxyNormActivation(4, "relu")  # a module pickled before the attribute existed
    del old.__dict__["relu_form"]
    assert pickle.loads(pickle.dumps(old)).relu_form
    import normfree

    preact = normfree.create_model("lnpn_resnet_cifar20").stages[0][0]
    for block in (NormAct(4, "ln"), preact):  # blocks pickled before the flag existed
        del block.__dict__["fold_scales"]
        assert pickle.loads(pickle.dumps(block)).fold_scales
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(13))
    m.eps, m.scale = 0.0, True
    randomize_(m, seed=14)
    with torch.no_grad():
        torch.testing.assert_close(m(x), literal_pn_act(m, x, torch.relu), rtol=1e-5, atol=1e-5)


def test_gradients_reach_all_four_parameters() -> None:
    m = ProxyNormActivation(4, "relu")
    x = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(6))
    (m(x) * torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(7))).sum().backward()
    for k in ("weight", "bias", "proxy_weight", "proxy_bias"):
        g = getattr(m, k).grad
        assert g is not None and torch.isfinite(g).all()
        assert (g.abs() > 1e-6).all(), k

    # With the statistics detached, γ̃ and β̃ would get no gradient at all: they are only
    # reached through E and Var, so the check above shows the statistics are differentiated.
    m.zero_grad()
    mean, var = m.proxy_moments()
    (mean.sum() + var.sum()).backward()
    assert (m.proxy_weight.grad.abs() > 0).all() and (m.proxy_bias.grad.abs() > 0).all()


# --------------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["relu", "silu"])
def test_folded_equals_unfolded(name: str) -> None:
    m = ProxyNormActivation(6, name)
    randomize_(m, seed=8)
    folded = m.folded()
    assert isinstance(folded, FoldedProxyNormActivation)
    assert list(folded.parameters()) == []
    assert set(folded.state_dict()) == {"weight", "bias", "out_scale", "out_bias"}
    x = torch.randn(3, 6, 5, 5, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m(x), rtol=1e-6, atol=1e-6)
    scale, shift = m.folded_affine()
    mean, var = m.proxy_moments()
    torch.testing.assert_close(scale, (var + EPS).rsqrt())
    torch.testing.assert_close(shift, -mean * (var + EPS).rsqrt())
    torch.testing.assert_close(folded.out_scale, scale.detach(), rtol=0, atol=0)
    torch.testing.assert_close(folded.out_bias, shift.detach(), rtol=0, atol=0)


def test_fold_proxy_norm_on_a_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), NormAct(8, "gn", num_groups=4), nn.Conv2d(8, 4, 1))
    randomize_(model[1].act, seed=10)
    model.eval()
    folded = fold_proxy_norm(model)
    assert isinstance(model[1].act, ProxyNormActivation)  # original untouched
    assert isinstance(folded[1].act, FoldedProxyNormActivation)
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
    assert fold_proxy_norm(model, inplace=True) is model
    assert isinstance(model[1].act, FoldedProxyNormActivation)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fold_proxy_norm("model")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# NormAct blocks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["gn", "ln"])
@pytest.mark.parametrize("proxy", [True, False])
def test_norm_act_is_batch_independent(norm: str, proxy: bool) -> None:
    block = NormAct(8, norm, proxy=proxy, activation="silu", num_groups=4)
    if proxy:
        randomize_(block.act, seed=12)
    x = torch.randn(5, 8, 6, 6, generator=torch.Generator().manual_seed(13))
    for mode in (True, False):
        block.train(mode)
        with torch.no_grad():
            batched = block(x)
            alone = torch.cat([block(x[i : i + 1]) for i in range(5)])
            shuffled = block(x.flip(0)).flip(0)
        torch.testing.assert_close(alone, batched, rtol=0, atol=1e-6)
        torch.testing.assert_close(shuffled, batched, rtol=0, atol=1e-6)


def test_batchnorm_block_is_not_batch_independent_in_training() -> None:
    block = NormAct(8, "bn", proxy=True).train()
    x = torch.randn(5, 8, 6, 6, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        diff = (block(x)[:1] - block(x[:2])[:1]).abs().max().item()
    assert diff > 1e-3


def test_norm_act_matches_manual_composition() -> None:
    x = torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(15))
    ln_pn = NormAct(8, "ln", proxy=True, activation="relu")
    randomize_(ln_pn.act, seed=16)
    ref = ln_pn.act(F.layer_norm(x, x.shape[1:], eps=1e-3))
    torch.testing.assert_close(ln_pn(x), ref, rtol=1e-5, atol=1e-5)
    assert list(ln_pn.norm.parameters()) == []  # no affine before PN

    gn = NormAct(8, "gn", proxy=False, activation="relu", num_groups=2, eps_norm=1e-5)
    with torch.no_grad():
        gn.norm.weight.uniform_(0.5, 1.5)
        gn.norm.bias.uniform_(-0.5, 0.5)
    ref = F.relu(F.group_norm(x, 2, gn.norm.weight, gn.norm.bias, eps=1e-5))
    torch.testing.assert_close(gn(x), ref, rtol=0, atol=1e-6)

    plain = NormAct(8, "none", proxy=False, activation="silu")
    torch.testing.assert_close(plain(x), F.silu(x))
    proj = NormAct(8, "gn", proxy=False, activation=None, num_groups=4)
    assert isinstance(proj.act, nn.Identity) and proj.norm.weight is not None


def _output_and_grads(model: nn.Module, x: torch.Tensor, up: torch.Tensor) -> list[torch.Tensor]:
    xi = x.clone().requires_grad_()
    out = model(xi)
    return [out, *torch.autograd.grad(out, (xi, *model.parameters()), up)]


@pytest.mark.parametrize("norm", ["ln", "gn"])
@pytest.mark.parametrize("top", [False, True])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_group_norm_and_pn_act_as_one_kernel_equal_the_two_modules(
    norm: str, top: bool, activation: str
) -> None:
    """``norm_then_act`` (GN carrying PN's affine; with ReLU also its output scale, then an
    in-place ReLU and the shift) gives the two modules' output and every gradient, in float64;
    ``plain_forward`` runs the modules."""
    block = NormAct(8, norm, num_groups=4, activation=activation).double()
    if top:  # the network "Top": centering only (a = 1)
        block.act = ProxyNormActivation(8, activation, scale=False).double()
    randomize_(block.act, seed=20)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64, generator=gen)
    up = torch.randn(3, 8, 5, 5, dtype=torch.float64, generator=gen)
    calls: list[str] = []
    block.norm.register_forward_hook(lambda *_: calls.append("norm"))
    fused = _output_and_grads(block, x, up)
    assert calls == []  # one kernel: the norm module is not called
    with plain_forward(block):
        plain = _output_and_grads(block, x, up)
    assert calls == ["norm"] and block.fold_scales
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_a_norm_with_its_own_affine_runs_as_the_two_modules() -> None:
    """A group norm that keeps an affine (model surgery) is not folded into PN-Act's kernel."""
    block = NormAct(8, "gn", num_groups=4).double()
    block.norm = nn.GroupNorm(4, 8, eps=1e-3).double()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 2.0)
        block.norm.bias.normal_()
    randomize_(block.act, seed=25)
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.act(block.norm(x)), rtol=0, atol=0)


@pytest.mark.parametrize(
    "name", ["lnpn_resnet_cifar20", "gnpn_resnet_cifar20", "efficientnet_b0_g16_lnpn"]
)
def test_pn_resnet_folded_equals_its_plain_form(name: str) -> None:
    """A whole PN model (ReLU ResNets, a SiLU EfficientNet) with its norm/PN-Act pairs as one
    kernel equals the form that calls every module (output and every parameter's gradient,
    float64), and a torch.fx trace of a ResNet block records the modules."""
    import normfree

    torch.manual_seed(22)
    model = normfree.create_model(name, num_classes=5).double()
    for m in model.modules():
        if isinstance(m, ProxyNormActivation):
            randomize_(m, seed=23)
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=gen)
    up = torch.randn(2, 5, dtype=torch.float64, generator=gen)
    torch.manual_seed(25)  # the same dropout and stochastic-depth draws in both runs
    fused = _output_and_grads(model, x, up)
    torch.manual_seed(25)
    with plain_forward(model):
        plain = _output_and_grads(model, x, up)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    if name.startswith("efficientnet"):
        return
    graph = torch.fx.symbolic_trace(model.stages[0][0]).graph
    targets = {n.target for n in graph.nodes if n.op == "call_module"}
    assert {"norm1", "norm2", "act1.act", "act2.act"} <= targets  # (PN-Act traced through)


def test_norm_act_works_on_2d_input() -> None:
    block = NormAct(6, "ln", proxy=True, activation="silu")
    x = torch.randn(4, 6)
    torch.testing.assert_close(block(x), block.act(F.layer_norm(x, (6,), eps=1e-3)))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="unknown activation"):
        ProxyNormActivation(3, "nope")
    with pytest.raises(ValueError, match="not elementwise"):
        ProxyNormActivation(3, "glu")
    with pytest.raises(TypeError, match="activation must be"):
        ProxyNormActivation(3, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        ProxyNormActivation(3, eps=-1.0)
    with pytest.raises(ValueError, match="num_channels"):
        ProxyNormActivation(0)
    with pytest.raises(ValueError, match="num_quantiles"):
        ProxyNormActivation(3, num_quantiles=1)
    with pytest.raises(ValueError, match="divisible"):
        NormAct(10, "gn", num_groups=4)
    with pytest.raises(ValueError, match="norm must be"):
        NormAct(8, "in")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs an activation"):
        NormAct(8, "ln", proxy=True, activation=None)
    with pytest.raises(ValueError, match="elementwise"):
        ProxyNormActivation(3, lambda t: t.sum(dim=1)).proxy_moments()


def test_custom_callable_activation() -> None:
    m = ProxyNormActivation(2, torch.tanh)
    ref = ProxyNormActivation(2, nn.Tanh())
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)


def test_reset_parameters_and_state_dict() -> None:
    m = ProxyNormActivation(3)
    randomize_(m, seed=17)
    copy = ProxyNormActivation(3)
    copy.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(copy(x), m(x), rtol=0, atol=0)
    m.reset_parameters()
    assert m.weight.eq(1).all() and m.bias.eq(0).all()
    assert m.proxy_weight.eq(0).all() and m.proxy_bias.eq(0).all()


# --------------------------------------------------------------------------------------------
# Weight-decay declarations
# --------------------------------------------------------------------------------------------
class PNNet(nn.Module):
    """A tiny model declaring its no-decay set the way normfree models do with PN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.block = NormAct(8, "gn", num_groups=4)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.conv(x)).mean((2, 3)))

    def no_weight_decay_names(self) -> set[str]:
        small = {n for n, p in self.named_parameters() if p.ndim <= 1}
        return small - proxy_norm_decay_names(self)


def test_decay_declarations_and_param_groups() -> None:
    model = PNNet()
    assert proxy_norm_decay_names(model) == {"block.act.proxy_weight", "block.act.proxy_bias"}
    assert proxy_norm_no_decay_names(model) == {"block.act.weight", "block.act.bias"}
    groups = build_param_groups(model, lr=0.1, weight_decay=1e-4, clipping=None)
    by_name = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert by_name["block.act.proxy_weight"] == by_name["block.act.proxy_bias"] == 1e-4
    assert by_name["block.act.weight"] == by_name["block.act.bias"] == 0.0
    assert by_name["conv.weight"] == 1e-4 and by_name["fc.bias"] == 0.0
    with pytest.raises(TypeError, match=r"nn\.Module"):
        proxy_norm_decay_names([])  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("activation", ["silu", "relu"])  # relu: norm_then_act in eager mode
def test_torchscript_and_export(activation: str) -> None:
    block = NormAct(8, "gn", num_groups=4, activation=activation).eval()
    randomize_(block.act, seed=18)
    x = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(19))
    with torch.no_grad():
        ref = block(x)
        torch.testing.assert_close(torch.jit.script(block)(x), ref, rtol=1e-6, atol=1e-6)
        folded = fold_proxy_norm(block)
        torch.testing.assert_close(torch.jit.script(folded)(x), ref, rtol=1e-5, atol=1e-6)
    exported = torch.export.export(block, (x,))
    torch.testing.assert_close(exported.module()(x), ref, rtol=1e-6, atol=1e-6)


def test_centering_only_variant_subtracts_the_proxy_mean() -> None:
    """``scale=False`` (the network "Top"): φ(γy+β) − E[φ(γY+β)], and it folds exactly."""
    torch.manual_seed(0)
    pn = ProxyNormActivation(3, "relu", scale=False)
    with torch.no_grad():
        pn.bias.uniform_(-0.5, 0.5)
        pn.proxy_weight.uniform_(-0.2, 0.2)
    y = torch.randn(4, 3, 5, 5)
    mean, _ = pn.proxy_moments()
    expected = torch.relu(y + pn.bias[None, :, None, None]) - mean[None, :, None, None]
    torch.testing.assert_close(pn(y), expected)
    torch.testing.assert_close(pn.folded()(y), pn(y))


def test_a_module_built_under_inference_mode_still_converts() -> None:
    """Recomputing the quantiles in place on every conversion failed for a module built under
    torch.inference_mode(): "Inplace update to inference tensor outside InferenceMode"."""
    with torch.inference_mode():
        built = ProxyNormActivation(4)
    plain = ProxyNormActivation(4)
    x = torch.randn(2, 4, 3, 3)
    for convert in (lambda m: m.to("cpu"), lambda m: m.float(), lambda m: m.double()):
        with torch.no_grad():
            assert torch.equal(convert(built)(x.to(built.quantiles.dtype)),
                               convert(plain)(x.to(plain.quantiles.dtype)))  # fmt: skip
