"""Residual primitives: stochastic depth, SkipInit gain, squeeze-excite, expected variance, head."""

from __future__ import annotations

import math

import pytest
import torch

from normfree.nn import (
    ClassifierHead,
    ExpectedVariance,
    SkipInitGain,
    SqueezeExcite,
    StochasticDepth,
    stochastic_depth_rates,
)


def test_stochastic_depth_rates_rule() -> None:
    assert stochastic_depth_rates(0.25, 4) == [0.0, 0.0625, 0.125, 0.1875]
    with pytest.raises(ValueError, match="rate"):
        stochastic_depth_rates(1.0, 3)


def test_stochastic_depth_per_example_mask_without_rescaling() -> None:
    torch.manual_seed(0)
    sd = StochasticDepth(0.3).train()
    x = torch.ones(20000, 3, 2, 2)
    y = sd(x)
    per_example = y.flatten(1)
    # each example is either kept whole (exactly 1, no 1/keep rescaling) or dropped whole
    assert torch.all((per_example == 0).all(1) | (per_example == 1).all(1))
    kept = (per_example[:, 0] == 1).float().mean().item()
    # binomial std at n=20000 is 0.0032: 5 sigma tolerance
    assert kept == pytest.approx(0.7, abs=0.016)
    sd.eval()
    assert torch.equal(sd(x), x)


def test_stochastic_depth_scale_by_keep_is_unbiased() -> None:
    torch.manual_seed(1)
    sd = StochasticDepth(0.5, scale_by_keep=True).train()
    y = sd(torch.ones(40000, 1))
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert y.mean().item() == pytest.approx(1.0, abs=0.03)


def test_skipinit_gain_starts_at_zero_and_resets() -> None:
    g = SkipInitGain()
    assert g.gain.shape == () and g.gain.item() == 0.0
    x = torch.randn(2, 3)
    assert torch.equal(g(x), torch.zeros_like(x))
    with torch.no_grad():
        g.gain.fill_(3.0)
    torch.testing.assert_close(g(x), 3 * x)
    g.reset_parameters()
    assert g.gain.item() == 0.0
    assert SkipInitGain(0.5).gain.item() == 0.5
    for bad in (float("nan"), float("inf")):  # NaN made every block output NaN
        with pytest.raises(ValueError, match="initial value must be finite"):
            SkipInitGain(bad)


def test_squeeze_excite_matches_manual_formula() -> None:
    torch.manual_seed(0)
    se = SqueezeExcite(8, 4)
    x = torch.randn(2, 8, 5, 5)
    s = x.mean(dim=(2, 3))
    h = torch.relu(s @ se.fc1.weight[:, :, 0, 0].T + se.fc1.bias)
    gate = torch.sigmoid(h @ se.fc2.weight[:, :, 0, 0].T + se.fc2.bias)
    torch.testing.assert_close(se(x), x * 2 * gate[:, :, None, None])
    with pytest.raises(ValueError, match="hidden_channels"):
        SqueezeExcite(8, 0)


def test_squeeze_excite_fx_trace_runs_with_and_without_out_gain() -> None:
    """A ``torch.fx`` trace of the module alone makes ``out_gain`` an input; the traced graph
    used to multiply by it unconditionally and fail on ``se(x)`` (None)."""
    torch.manual_seed(0)
    se = SqueezeExcite(8, 4)
    gm = torch.fx.symbolic_trace(se)
    x, gain = torch.randn(2, 8, 5, 5), torch.tensor(0.3)
    torch.testing.assert_close(gm(x), se(x), rtol=0, atol=0)
    torch.testing.assert_close(gm(x, gain), se(x, gain), rtol=0, atol=0)


def test_expected_variance_resets_after_transitions() -> None:
    alpha = 0.2
    ev = ExpectedVariance(alpha)
    multipliers = [ev.next_block(first_in_stage=(b == 0)) for b in range(3)]
    multipliers += [ev.next_block(first_in_stage=(b == 0)) for b in range(4)]
    assert ev.history == pytest.approx([1.04, 1.08, 1.12, 1.04, 1.08, 1.12, 1.16])
    # the transition block of stage 2 sees the variance stage 1 accumulated (1.12)
    assert multipliers[3] == pytest.approx(1 / math.sqrt(1.12))
    assert multipliers[:3] == pytest.approx([1.0, 1 / math.sqrt(1.04), 1 / math.sqrt(1.08)])


def test_classifier_head_init_and_reset() -> None:
    torch.manual_seed(0)
    head = ClassifierHead(512, 1000, drop_rate=0.2, init_std=0.01)
    assert head.fc.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.count_nonzero(head.fc.bias) == 0
    x = torch.randn(4, 512, 3, 3)
    head.eval()
    torch.testing.assert_close(head(x, pre_logits=True), x.mean(dim=(2, 3)))
    head.reset(0)
    assert head.num_classes == 0 and head(x).shape == (4, 512)
    zero = ClassifierHead(16, 3, init_std=0.0)
    assert torch.count_nonzero(zero.fc.weight) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_features": 0}, "in_features must be an int >= 1, got 0"),  # was Linear(0, 10)
        ({"in_features": 2.5}, "in_features must be an int >= 1"),
        ({"drop_rate": 1.0}, r"drop_rate must be in \[0, 1\), got 1.0"),
        ({"init_std": -0.01}, "init_std must be a finite number >= 0"),
        ({"init_std": float("nan")}, "init_std must be a finite number >= 0"),
    ],
)
def test_classifier_head_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"in_features": 16, "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        ClassifierHead(**args)


def test_squeeze_excite_starts_as_the_official_hk_linear() -> None:
    """nfnets/base.py builds its SE from two ``hk.Linear``: weights N(0, 1/fan_in) truncated at
    ±2 std (std 0.8796/√fan_in), biases zero. The layers kept ``nn.Conv2d``'s uniform init with
    a random bias (std 0.577/√fan_in), so each channel's gate started away from 1. Checked on
    NFNet-F0's last block (1536 → 768 → 1536) and after ``reset_parameters``."""
    import math

    import normfree

    torch.manual_seed(0)
    model = normfree.create_model("nfnet_f0")
    for _ in range(2):
        se = [m for m in model.modules() if isinstance(m, SqueezeExcite)][-1]
        for fc, fan_in in ((se.fc1, 1536), (se.fc2, 768)):
            w = fc.weight.detach() * math.sqrt(fan_in)
            assert abs(float(w.std()) - 0.87962566) < 0.01  # std of N(0,1) cut at ±2
            assert float(w.abs().max()) <= 2.0 and abs(float(w.mean())) < 0.01
            assert torch.equal(fc.bias.detach(), torch.zeros_like(fc.bias))
        with torch.no_grad():  # a zero pooled input gives logit 0: the gate is 2·sigmoid(0) = 1
            logit = se.fc2(se.act(se.fc1(torch.zeros(1, 1536, 1, 1))))
        assert torch.equal(logit, torch.zeros_like(logit))
        model.reset_parameters()
