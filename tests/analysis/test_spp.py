"""Signal Propagation Plots (Brock et al. 2021a, §3) on small CPU networks."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import normfree
from normfree.analysis import SPPResult, channel_stats, plot_spp, signal_propagation
from normfree.analysis.spp import save_results, write_csv
from normfree.nn import SkipInitGain

ALPHA = 0.2  # NF-ResNet default


def _model(name: str, **overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return normfree.create_model(name, **overrides)


def test_channel_stats_match_slow_reference() -> None:
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0]).view(
        1, 3, 1, 1
    ) + torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    sq, var = channel_stats(x)
    means = [x[:, c].mean().item() for c in range(3)]
    variances = [((x[:, c] - means[c]) ** 2).mean().item() for c in range(3)]  # biased
    assert sq == pytest.approx(sum(m * m for m in means) / 3, rel=1e-12)
    assert var == pytest.approx(sum(variances) / 3, rel=1e-12)
    # channels-last layout gives the same numbers
    assert channel_stats(x.permute(0, 2, 3, 1), channel_dim=-1) == pytest.approx((sq, var))


def test_nf_resnet_with_ws_variance_follows_one_plus_k_alpha_squared() -> None:
    model = _model("nf_resnet_cifar20")
    result = signal_propagation(model, input_shape=(3, 32, 32), batch_size=16,
                                skip_gains_to_one=True)  # fmt: skip
    blocks = result.block_points()
    assert result.names[0] == "stem" and len(blocks) == 9
    assert result.stage_boundaries == [4, 7]
    k = 0
    for p in blocks:
        k = 1 if (p.is_transition or k == 0) else k + 1
        expected = 1 + k * ALPHA**2  # resets after each transition block
        assert p.avg_var == pytest.approx(expected, rel=0.10), (p.name, p.avg_var, expected)
        assert 0.7 < p.res_avg_var < 1.3  # branch sees unit-variance input
    # WS removes the mean shift: squared channel means stay near zero
    assert max(result.avg_sq_mean) < 0.01


def test_nf_resnet_with_he_init_shows_mean_shift() -> None:
    model = _model("nf_resnet_cifar20", use_ws=False)
    result = signal_propagation(model, input_shape=(3, 32, 32), batch_size=16,
                                skip_gains_to_one=True)  # fmt: skip
    blocks = result.block_points()
    assert blocks[-1].avg_sq_mean >= 10 * blocks[0].avg_sq_mean


def test_bn_resnet_variance_grows_linearly_within_a_stage() -> None:
    model = _model("bn_resnet_cifar56")  # 9 blocks per stage
    result = signal_propagation(model, input_shape=(3, 16, 16), batch_size=8)
    blocks = result.block_points()
    stages = sorted({p.stage for p in blocks})
    for s in stages:
        var = [p.avg_var for p in blocks if p.stage == s]
        steps = [b - a for a, b in itertools.pairwise(var)]
        mean_step = sum(steps) / len(steps)
        assert 0.4 < mean_step < 1.0  # ≈ the branch variance added per block
        assert all(abs(d - mean_step) < 0.3 * mean_step for d in steps)
    # reset at each transition
    for a, b in itertools.pairwise(blocks):
        if b.is_transition:
            assert b.avg_var < 0.5 * a.avg_var


def test_json_and_csv_round_trip(tmp_path) -> None:
    model = _model("nf_resnet_cifar20")
    result = signal_propagation(model, input_shape=(3, 8, 8), batch_size=4, skip_gains_to_one=True)
    back = SPPResult.from_json(result.to_json(tmp_path / "spp.json"))
    assert back == result  # floats round-trip exactly through JSON
    both = SPPResult.from_json(save_results([result, result], tmp_path / "two.json"))
    assert both == [result, result]
    lines = write_csv([result], tmp_path / "spp.csv").read_text().splitlines()
    assert lines[0] == (
        "label,index,name,kind,stage,is_transition,avg_sq_mean,avg_var,res_avg_var,samples"
    )
    assert len(lines) == 1 + len(result)
    assert lines[1].endswith(",,256")  # the stem has no residual branch; 4 × 8 × 8 values
    with pytest.raises(ValueError, match="not a normfree SPP"):
        SPPResult.from_dict({"format": "other"})


def test_skip_gains_to_one_and_mode_are_restored_exactly() -> None:
    model = _model("bn_resnet_cifar20")
    model.eval()
    model.stages[1].train()  # mixed modes must come back per module
    before_modes = {n: m.training for n, m in model.named_modules()}
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    signal_propagation(model, input_shape=(3, 8, 8), batch_size=4, skip_gains_to_one=True)
    assert {n: m.training for n, m in model.named_modules()} == before_modes
    for k, v in model.state_dict().items():  # BN running stats untouched
        assert torch.equal(v, before_state[k]), k


class _Exploding(nn.Module):
    """Raises in the middle of its forward pass, after some hooks have fired."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = _ResBlock()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.block(self.stem(x)))
        raise RuntimeError("boom")


class _ResBlock(normfree.nn.ResidualBlock):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.skip_gain = SkipInitGain(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.skip_gain(self.branch_probe(self.conv(x)))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_state_restored_after_an_exception() -> None:
    from normfree.analysis import batch_dependence, power_profile, propagate_moments

    model = _Exploding().eval()
    model.block.train()
    modes = [m.training for m in model.modules()]
    running = model.bn.running_mean.clone()
    gain = model.block.skip_gain.gain.detach().clone()
    calls = [
        lambda: signal_propagation(model, input_shape=(3, 6, 6), batch_size=3,
                                   skip_gains_to_one=True),
        lambda: propagate_moments(model, input_shape=(3, 6, 6), batch_size=3,
                                  skip_gains_to_one=True),
        lambda: power_profile(model, input_shape=(3, 6, 6), batch_size=3, points="bn"),
        lambda: batch_dependence(model, input_shape=(3, 6, 6), batch_size=3),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(RuntimeError, match="boom"):
            call()
        assert _hook_count(model) == 0
        assert [m.training for m in model.modules()] == modes
        assert torch.equal(model.block.skip_gain.gain, gain)  # bit-exact
        assert torch.equal(model.bn.running_mean, running)


def test_real_batches_and_named_points_on_torchvision_resnet() -> None:
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.resnet18(weights=None)
    x = torch.randn(4, 3, 32, 32)
    result = signal_propagation(model, inputs=x, branch_points="layer?.*.bn2")
    assert result.names[0] == "layer1.0:input" and len(result.block_points()) == 8
    assert result.stage_boundaries == [3, 5, 7]
    # the branch ends in a train-mode BN with unit weight: variance 1 (up to BN's eps)
    assert all(p.res_avg_var == pytest.approx(1.0, abs=1e-3) for p in result.block_points())
    assert result.config["input"] == "data"
    named = signal_propagation(model, inputs=x, points=["maxpool", "layer?.?"])
    assert named.names[0] == "maxpool" and named.points[0].kind == "point"
    assert named.avg_var[1:] == pytest.approx(result.avg_var[1:], rel=1e-12)
    with pytest.raises(ValueError, match="lies inside none"):
        signal_propagation(model, inputs=x, branch_points="fc")


def test_reused_module_and_missing_input_size_are_clear_errors() -> None:
    act = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 3, 1), act, nn.Conv2d(3, 3, 1), act)
    with pytest.raises(ValueError, match="more than once"):
        signal_propagation(model, input_shape=(3, 4, 4), points=["1"])
    with pytest.raises(ValueError, match="input_shape"):
        signal_propagation(model, points=["0"])
    with pytest.raises(ValueError, match="move the model"):
        signal_propagation(model, input_shape=(3, 4, 4), points=["0"], device="meta")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        signal_propagation("resnet", input_shape=(3, 4, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"input_shape=\(3, 8, 8\) disagree"):
        signal_propagation(model, inputs=torch.randn(2, 3, 4, 4), input_shape=(3, 8, 8),
                           points=["0"])  # fmt: skip


def test_gaussian_input_is_seeded() -> None:
    model = _model("nf_resnet_cifar20")
    a = signal_propagation(model, input_shape=(3, 8, 8), batch_size=4, seed=3)
    b = signal_propagation(model, input_shape=(3, 8, 8), batch_size=4, seed=3)
    c = signal_propagation(model, input_shape=(3, 8, 8), batch_size=4, seed=4)
    assert a == b and a.avg_var != c.avg_var


def test_plot_spp_writes_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    model = _model("nf_resnet_cifar20")
    r = signal_propagation(model, input_shape=(3, 8, 8), batch_size=4, skip_gains_to_one=True)
    path = tmp_path / "spp.png"
    fig = plot_spp([r, r], path, labels=["a", "b"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 3
    with pytest.raises(ValueError, match="labels"):
        plot_spp([r], labels=["a", "b"])


def test_plot_without_matplotlib_raises_clear_import_error(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    r = SPPResult("x", [], {})
    with pytest.raises(ImportError, match=r"normfree\[plot\]"):
        plot_spp(r)


def test_a_float32_batch_runs_through_a_float64_model() -> None:
    """A real float32 batch given to a float64 model ended in PyTorch's "Input type (float) and
    bias type (double) should be the same"; it is cast like the Gaussian batch is."""
    from normfree.analysis import batch_dependence, power_profile, propagate_moments

    model = _model("nf_resnet_cifar20").double()
    x32 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    spp = signal_propagation(model, inputs=x32, skip_gains_to_one=True)
    ref = signal_propagation(model, inputs=x32.double(), skip_gains_to_one=True)
    assert spp.avg_var == ref.avg_var and spp.avg_sq_mean == ref.avg_sq_mean  # exact
    chi = propagate_moments(model, inputs=x32, skip_gains_to_one=True).chi
    assert chi == propagate_moments(model, inputs=x32.double(), skip_gains_to_one=True).chi
    assert power_profile(model, inputs=x32, points="stages.*.*").points[0].total > 0
    assert [r.dependent for r in batch_dependence(model, inputs=x32)] == [False, False]
    # integer inputs (token ids) keep their dtype
    emb = nn.Sequential(nn.Embedding(10, 4))
    tokens = torch.randint(0, 10, (4, 5))
    assert len(signal_propagation(emb, inputs=tokens, points=["0"], channel_dim=-1)) == 1


def test_rrelu_runs_in_eval_mode_and_the_rng_is_left_alone() -> None:
    # nn.RReLU draws random slopes in train mode: two SPPs of one model differed and each
    # advanced the caller's random numbers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.RReLU(), nn.Linear(8, 8))
    state = torch.get_rng_state()
    first = signal_propagation(model, input_shape=(8,), points=["1", "2"])
    assert torch.equal(torch.get_rng_state(), state)
    assert signal_propagation(model, input_shape=(8,), points=["1", "2"]).avg_var == first.avg_var
    assert model[1].training  # the module's own flag is back


def test_one_result_can_be_saved_like_a_list(tmp_path) -> None:
    # write_csv(result, path) and save_results(result, path) failed with "'SPPResult' object is
    # not iterable" (plot_spp takes one result or several)
    result = signal_propagation(_model("nf_resnet_cifar20"), input_shape=(3, 8, 8), batch_size=2)
    write_csv(result, tmp_path / "one.csv")
    write_csv([result], tmp_path / "list.csv")
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "list.csv").read_text()
    save_results(result, tmp_path / "one.json")
    (back,) = SPPResult.from_json(tmp_path / "one.json")
    assert back == result
    with pytest.raises(TypeError, match="expected SPPResult objects, got dict"):
        save_results([result.to_dict()], tmp_path / "bad.json")  # type: ignore[list-item]
    assert not (tmp_path / "bad.json").exists()


def test_log_scale_plot_of_all_zero_branches_stays_linear_without_warnings(tmp_path) -> None:
    # Fixup's branches are exactly 0 at init: the log-scaled panel came out empty, with a
    # misleading 1-10 axis and matplotlib's "Data has no positive values" warning on stderr
    pytest.importorskip("matplotlib")
    import warnings

    r = signal_propagation(_model("fixup_resnet_cifar20"), input_shape=(3, 8, 8), batch_size=4)
    assert all(v == 0.0 for v in r.res_avg_var[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_spp(r, tmp_path / "fixup.png", log_scale=True)
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log", "linear"]
    assert [t.get_text() for t in fig.axes[2].texts] == ["no positive values: linear scale"]


def test_a_non_finite_result_reads_back_and_prints(tmp_path) -> None:
    """JSON writes NaN and inf as null: reading it back gave None in float fields, on which
    ``table()`` failed. They read back as NaN now, and old files without ``samples`` load."""
    import json
    import math

    model = _model("nf_resnet_cifar20", alpha=1e39)  # α² overflows float32: inf, then NaN
    result = signal_propagation(model, input_shape=(3, 8, 8), batch_size=2, skip_gains_to_one=True)
    assert result.config["non_finite_points"]
    back = SPPResult.from_json(result.to_json(tmp_path / "nan.json"))
    assert isinstance(back, SPPResult) and "nan" in back.table()
    assert all(math.isnan(p.avg_var) for p, q in zip(back.points, result.points)
               if not math.isfinite(q.avg_var))  # fmt: skip
    data = json.loads((tmp_path / "nan.json").read_text())
    for point in data["points"]:
        del point["samples"]
    assert all(p.samples is None for p in SPPResult.from_dict(data).points)
