"""Power decomposition of pre-activations (Labatie et al. 2021, Proxy Normalization, §3)."""

from __future__ import annotations

import pytest
import torch

import normfree
from normfree.analysis import FeedforwardProbe, PowerResult, power_decomposition, power_profile
from normfree.nn import SkipInitGain


def _slow_reference(y: torch.Tensor) -> dict[str, float]:
    n, c = y.shape[:2]
    flat = y.reshape(n, c, -1)
    p = flat.shape[2]
    chan, inst, within = 0.0, 0.0, 0.0
    for ch in range(c):
        mus = [sum(flat[i, ch, a].item() for a in range(p)) / p for i in range(n)]
        mu = sum(mus) / n
        chan += mu * mu
        inst += sum((m - mu) ** 2 for m in mus) / n
        for i in range(n):
            within += sum((flat[i, ch, a].item() - mus[i]) ** 2 for a in range(p)) / p / n
    total = float((flat**2).mean())
    return {"channel_mean": chan / c, "instance": inst / c, "within": within / c, "total": total}


def test_decomposition_matches_slow_reference_and_sums_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 4, 2, 3, generator=gen, dtype=torch.float64) * 1.5 + torch.arange(
        4.0, dtype=torch.float64
    ).view(1, 4, 1, 1)
    got = power_decomposition(y)
    ref = _slow_reference(y)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-12)
    # E[y²] = channel-mean + instance + within, exactly (law of total variance)
    parts = got["channel_mean"] + got["instance"] + got["within"]
    assert parts == pytest.approx(got["total"], rel=1e-13)


def test_decomposition_identity_on_float32_network_activations() -> None:
    torch.manual_seed(0)
    model = FeedforwardProbe(depth=4, width=8, norm="layer", affine_std=0.2)
    r = power_profile(model, input_shape=(3, 6, 6), batch_size=8, points="layers.*.norm")
    for p in r.points:
        assert p.channel_mean + p.instance + p.within == pytest.approx(p.total, rel=1e-10)
        assert sum(p.shares) == pytest.approx(1.0, rel=1e-10)


def test_no_positions_means_no_within_power() -> None:
    y = torch.randn(10, 3, dtype=torch.float64)
    d = power_decomposition(y)
    assert d["within"] == 0.0
    assert d["channel_mean"] + d["instance"] == pytest.approx(d["total"], rel=1e-13)
    with pytest.raises(ValueError, match="batch axis"):
        power_decomposition(y, channel_dim=0)


def test_layer_norm_collapses_towards_channel_wise_constants(tmp_path) -> None:
    torch.manual_seed(0)
    model = FeedforwardProbe(depth=12, width=16, norm="layer", affine_std=0.2)
    r = power_profile(model, input_shape=(3, 8, 8), batch_size=8, points="layers.*.norm")
    share = r.channel_mean_share
    assert share[0] < 0.15
    assert sum(share[-4:]) / 4 > 0.5  # channel-wise constants carry most of the power at depth
    half = len(share) // 2
    assert sum(share[half:]) / (len(share) - half) > sum(share[:half]) / half  # grows with depth
    assert PowerResult.from_json(r.to_json(tmp_path / "p.json")) == r


def test_instance_norm_has_zero_instance_variability() -> None:
    torch.manual_seed(0)
    model = FeedforwardProbe(depth=6, width=8, norm="instance", affine_std=0.2)
    r = power_profile(model, input_shape=(3, 8, 8), batch_size=8, points="layers.*.norm")
    for p in r.points:
        assert p.instance <= 1e-10 * p.total  # identically 0 up to rounding
        assert p.within > 0.5 * p.total
    # batch norm keeps the instance term
    torch.manual_seed(0)
    bn = FeedforwardProbe(depth=6, width=8, norm="batch", affine_std=0.2)
    rb = power_profile(bn, input_shape=(3, 8, 8), batch_size=8, points="layers.*.norm")
    assert all(p.instance > 1e-3 * p.total for p in rb.points)


def test_empty_activations_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"need non-empty \(N, C, \.\.\.\) activations"):
        power_decomposition(torch.randn(0, 3, 4, 4))


def test_power_profile_can_set_skip_gains_to_one_and_restores_them() -> None:
    # power_profile had no skip_gains_to_one: with NF-ResNet's zero gains every block output is
    # its input, so the profile of the block outputs was flat
    torch.manual_seed(0)
    model = normfree.create_model("nf_resnet_cifar20")
    gains = [m.gain for m in model.modules() if isinstance(m, SkipInitGain)]
    flat = power_profile(model, input_shape=(3, 8, 8), batch_size=4, points="stages.0.*")
    assert len({p.total for p in flat.points}) == 1  # identities: the same tensor three times
    live = power_profile(model, input_shape=(3, 8, 8), batch_size=4, points="stages.0.*",
                         skip_gains_to_one=True)  # fmt: skip
    assert live.points[1].total != live.points[0].total
    assert live.config["skip_gains_to_one"] is True
    assert all(g.item() == 0.0 for g in gains)
