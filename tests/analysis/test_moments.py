"""Moments and normalized sensitivity (Labatie 2019) with forward-mode AD."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normfree.analysis import (
    FeedforwardProbe,
    MomentsResult,
    ResNetProbe,
    effective_rank,
    fit_growth,
    moment_stats,
    propagate_moments,
)


def test_moment_stats_of_gaussian_match_closed_forms() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, 16, 16, generator=gen, dtype=torch.float64) * 2.0 + 1.0
    s = moment_stats(x)
    assert s["mu2"] == pytest.approx(4.0, rel=0.02)
    assert s["mu4"] == pytest.approx(3 * 16.0, rel=0.04)  # μ4 = 3σ⁴
    assert s["kurtosis"] == pytest.approx(3.0, rel=0.03)
    assert s["nu1_abs_z"] == pytest.approx(math.sqrt(2 / math.pi), rel=0.01)
    assert s["nu2"] == pytest.approx(5.0, rel=0.02)  # σ² + m²


def test_effective_rank_equals_svd_definition_and_iid_limit() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 12, 5, 5, generator=gen, dtype=torch.float64)
    x[:, 3] += 2.5 * x[:, 0]  # correlated channels
    m = x.permute(0, 2, 3, 1).reshape(-1, 12)
    s = torch.linalg.svdvals(m - m.mean(0))  # Labatie: λ = s² of the centred (NHW × C) matrix
    lam = s**2
    assert effective_rank(x) == pytest.approx(float(lam.sum() / lam.max()), rel=1e-10)
    # i.i.d. Gaussian features: r_eff ≈ C / (1 + sqrt(C/N))² (the largest sample-covariance
    # eigenvalue is ≈ (1 + sqrt(C/N))², Marchenko–Pastur; the trace is ≈ C)
    n, c = 20000, 64
    iid = torch.randn(n, c, generator=gen, dtype=torch.float64)
    assert effective_rank(iid) == pytest.approx(c / (1 + math.sqrt(c / n)) ** 2, rel=0.03)
    assert effective_rank(torch.ones(4, 3)) == 0.0


def test_sensitivity_equals_reverse_mode_jvp_reference() -> None:
    torch.manual_seed(0)
    model = FeedforwardProbe(depth=3, width=6, norm="batch").double()
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = propagate_moments(model, inputs=x, seed=0)
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).double()
    model.train()
    # independent reference: the double-backward JVP of reverse-mode autograd
    y, jvp = torch.autograd.functional.jvp(model, x, dx)
    last = result.points[-1]
    assert last.mu2_dx == pytest.approx(float(jvp.square().mean()), rel=1e-10)
    mu2_y = moment_stats(y)["mu2"]
    assert last.chi == pytest.approx(math.sqrt(float(jvp.square().mean()) / mu2_y), rel=1e-10)
    assert result.input_chi == pytest.approx(
        math.sqrt(float(dx.square().mean()) / moment_stats(x)["mu2"]), rel=1e-12
    )
    # increments chain: χ_l = χ_in · Π δχ
    prod = result.input_chi * math.prod(p.delta_chi for p in result.points)
    assert prod == pytest.approx(last.chi, rel=1e-10)


def test_linear_net_sensitivity_closed_form() -> None:
    # a single linear layer y = 3x: dx is scaled like x, so χ stays at its input value
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(3 * torch.eye(4))
    r = propagate_moments(model, input_shape=(4,), batch_size=64, points=["0"])
    assert r.points[0].chi == pytest.approx(r.input_chi, rel=1e-6)
    assert r.points[0].delta_chi == pytest.approx(1.0, rel=1e-6)


def test_fit_growth_on_synthetic_laws() -> None:
    depths = list(range(1, 31))
    exp = fit_growth([1.2**d for d in depths])
    assert exp.verdict == "exponential" and exp.exp_r2 == pytest.approx(1.0)
    assert exp.factor_per_layer == pytest.approx(1.2)
    power = fit_growth([d**0.4 for d in depths])
    assert power.verdict == "power law" and power.pow_r2 == pytest.approx(1.0)
    assert power.exponent == pytest.approx(0.4)
    assert fit_growth([1.0, 1.01, 1.02, 1.01]).verdict == "no growth"
    with pytest.raises(ValueError, match="at least 3"):
        fit_growth([1.0, 2.0])
    with pytest.raises(ValueError, match="depths must be > 0"):
        fit_growth([1.0, 2.0, 3.0], [0, 1, 2])


def test_bn_feedforward_grows_exponentially_bn_resnet_as_power_law(tmp_path) -> None:
    """Labatie 2019, Figs. 4–5 at CPU scale."""
    torch.manual_seed(0)
    ff = propagate_moments(FeedforwardProbe(depth=20, width=16), input_shape=(3, 8, 8),
                           batch_size=16)  # fmt: skip
    torch.manual_seed(0)
    res = propagate_moments(ResNetProbe(units=20, width=16), input_shape=(3, 8, 8),
                            batch_size=16)  # fmt: skip
    assert ff.fit.verdict == "exponential"
    assert ff.fit.exp_r2 > 0.99 and ff.fit.exp_r2 > ff.fit.pow_r2
    assert ff.fit.factor_per_layer > 1.1  # δχ > 1 at every layer, compounding
    assert all(p.delta_chi > 1.0 for p in ff.points)
    assert res.fit.verdict == "power law"
    assert res.fit.pow_r2 > 0.95 and res.fit.pow_r2 > res.fit.exp_r2
    assert ff.points[-1].chi > 10 * res.points[-1].chi
    # BN-ResNet moments stay Gaussian-like (no fat tails)
    assert all(abs(p.kurtosis - 3.0) < 0.5 for p in res.points)
    back = MomentsResult.from_json(ff.to_json(tmp_path / "m.json"))
    assert back == ff


@pytest.mark.slow  # a fresh process (the warning comes once per process)
def test_the_sensitivity_pass_warns_about_nothing_of_pytorch_internals() -> None:
    """Forward-mode AD makes PyTorch script its own decompositions on first use in a process,
    which recent releases report as a FutureWarning about ``torch.jit.script``; the analysis
    does not pass that on (a fresh process: the first use is what warns)."""
    import subprocess
    import sys

    code = (
        "import torch; from torch import nn\n"
        "from normfree.analysis import propagate_moments\n"
        "model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))\n"
        "propagate_moments(model, input_shape=(3, 8, 8), batch_size=2, points=['1', '2'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_shrinking_chi_is_fitted_not_called_no_growth() -> None:
    # χ falling 100-fold was "no growth" (only chi[-1]/chi[0] < 1.25 was tested)
    depths = list(range(1, 31))
    exp = fit_growth([0.85**d for d in depths])
    assert exp.verdict == "exponential" and exp.factor_per_layer == pytest.approx(0.85)
    assert exp.growth == pytest.approx(0.85**29)
    power = fit_growth([d**-0.5 for d in depths])
    assert power.verdict == "power law" and power.exponent == pytest.approx(-0.5)
    assert fit_growth([1.0, 0.99, 0.9, 0.81]).verdict == "no growth"  # 1/0.81 < 1.25


def test_an_operation_without_forward_ad_names_the_model() -> None:
    class Doubling(torch.autograd.Function):  # a custom Function without a jvp
        @staticmethod
        def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

        @staticmethod
        def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
            return 2 * grad

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return Doubling.apply(self.fc(x))

    with pytest.raises(RuntimeError) as info:
        propagate_moments(Net(), input_shape=(4,), batch_size=8, points=["fc"])
    assert str(info.value).startswith("Net uses an operation without a forward-mode AD formula, "
                                      "so the sensitivity cannot be propagated: You must "
                                      "implement the jvp function")  # fmt: skip


def test_an_input_without_variance_is_a_clear_error() -> None:
    # a batch of one flat example (or a constant batch) has μ₂(x) = 0 at the input: the input χ
    # ended in "ZeroDivisionError: float division by zero" after the whole forward pass
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    for kwargs in ({"input_shape": (4,), "batch_size": 1}, {"inputs": torch.ones(8, 4)}):
        with pytest.raises(ValueError, match=r"has no variance within any channel .* so χ is "
                           "undefined; use a larger batch or inputs that vary"):  # fmt: skip
            propagate_moments(model, points=["0", "1"], **kwargs)
    # one example with positions is fine: the per-channel moments run over H, W
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    r = propagate_moments(conv, input_shape=(3, 8, 8), batch_size=1, points=["0", "1"])
    assert math.isfinite(r.input_chi) and r.input_chi > 0


def test_a_non_finite_moments_result_reads_back_and_prints(tmp_path) -> None:
    """A constant point has kurtosis NaN and χ inf, which JSON writes as null: they read back
    as NaN (they were None, on which ``table()`` failed)."""
    from normfree.analysis.moments import GrowthFit, MomentsPoint, MomentsResult

    values = dict(nu1_abs=1.0, nu2=1.0, mu2=0.0, mu4=0.0, kurtosis=math.nan, nu1_abs_z=math.nan,
                  eff_rank=1.0, mu2_dx=0.0, eff_rank_dx=1.0, chi=math.inf, delta_chi=math.nan)
    result = MomentsResult("const", [MomentsPoint(0, "stem", "stem", 0, **values)], math.inf,
                           GrowthFit(math.nan, 0.0, 1.0, 0.5, math.inf, "no growth"))
    back = MomentsResult.from_json(result.to_json(tmp_path / "m.json"))
    assert math.isnan(back.points[0].kurtosis) and math.isnan(back.points[0].chi)
    assert math.isnan(back.input_chi) and math.isnan(back.fit.growth)
    assert "nan" in back.table()
