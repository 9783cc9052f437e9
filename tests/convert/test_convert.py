"""normfree.convert: BN networks → batch-independent ones (tiny inputs, one thread).

Reference values are the BN models' own eval outputs; BN statistics are made non-trivial by a
few train-mode batches of shifted, scaled noise first."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bn_stats import warm_bn
from normfree.convert import (
    ChannelAffine,
    ConversionError,
    ConvertedModel,
    convert_model,
    load_converted,
    save_converted,
)
from normfree.nn import ScaledStdConv2d, SkipInitGain
from normfree.optim.param_groups import build_param_groups

torchvision = pytest.importorskip("torchvision")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


_warm = warm_bn


def _inputs(n: int = 6, size: int = 16, chans: int = 3) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _batch_dependence(model: nn.Module, x: torch.Tensor, chunk: int = 1) -> float:
    """max |f(batch)_i − f(x_i in a batch of ``chunk``)| relative to the output scale."""
    with torch.no_grad():
        full = model(x)
        alone = torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    return float((full - alone).abs().max() / full.abs().max())


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return _warm(torchvision.models.resnet18(num_classes=10))


def test_bn_free_resnet18_equals_eval_outputs_and_is_batch_independent(resnet18):
    x = _inputs()
    with torch.no_grad():
        ref = resnet18(x)
    before = copy.deepcopy(resnet18.state_dict())
    resnet18.train()
    c = convert_model(resnet18, "bn_free", x, source="torchvision:resnet18",
                      source_kwargs={"num_classes": 10})  # fmt: skip
    assert resnet18.training  # the original keeps its mode and its tensors
    resnet18.eval()
    assert all(torch.equal(v, resnet18.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in c.modules())
    gains = [m for m in c.modules() if isinstance(m, SkipInitGain)]
    assert len(gains) == 8 and all(float(g.gain.detach()) == 1.0 for g in gains)  # 8 BasicBlocks
    with torch.no_grad():
        out = c(x)
    assert _rel(out, ref) < 1e-5
    assert c.report.rel_error < 1e-5 and c.report.top1_agreement == 1.0
    assert c.report.norms == 20 and c.report.residuals == 8
    for train in (True, False):  # the BN model in train mode depends on its batch; this not
        c.train(train)
        assert _batch_dependence(c, x) < 1e-5
    resnet18.train()
    assert _batch_dependence(resnet18, x, chunk=2) > 1e-2  # sanity: the check can fail
    resnet18.eval()
    # AGC groups: the classifier (last Linear) is found and not clipped
    assert c.classifier_parameter_names() == ["net.fc.weight", "net.fc.bias"]
    groups = build_param_groups(c, lr=0.1, weight_decay=1e-4, clipping=0.01)
    unclipped = {n for g in groups if g["clipping"] is None for n in g["param_names"]}
    assert unclipped == {"net.fc.weight", "net.fc.bias"}


def test_bn_free_mobilenet_v2_and_timm_resnet_exact():
    torch.manual_seed(0)
    mnet = _warm(torchvision.models.mobilenet_v2(num_classes=10, dropout=0.0))
    x = _inputs(4)
    c = convert_model(mnet, "bn_free", x)
    assert c.report.rel_error < 1e-5 and c.report.residuals == 10  # inverted residuals
    c.train()
    assert _batch_dependence(c, x) < 1e-5
    timm = pytest.importorskip("timm")
    tr = _warm(timm.create_model("resnet18", num_classes=10))
    c = convert_model(tr, "bn_free", _inputs())
    assert c.report.rel_error < 1e-5 and c.report.residuals == 8
    # timm's fused BatchNormAct2d (BN → drop → act in one module)
    mv3 = _warm(timm.create_model("mobilenetv3_small_050", num_classes=10))
    assert any(type(m).__name__ == "BatchNormAct2d" for m in mv3.modules())
    c = convert_model(mv3, "bn_free", _inputs(4))
    assert c.report.rel_error < 1e-5 and c.report.norms == 34


def test_nf_mode_is_ws_calibrated_bounded_and_batch_independent(resnet18):
    x, held = _inputs(8), torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    held = held * 2 + 0.5
    calibrated = convert_model(resnet18, "nf", x)
    mean_fit = convert_model(resnet18, "nf", x, nf_fit="mean")
    plain = convert_model(resnet18, "nf")
    ws = [m for m in calibrated.modules() if isinstance(m, ScaledStdConv2d)]
    assert len(ws) == 20
    # without data the WS weight is the folded weight minus its per-channel mean (one conv)
    conv, bn = resnet18.conv1, resnet18.bn1
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = conv.weight * scale.reshape(-1, 1, 1, 1)
    centred = folded - folded.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(plain.net.conv1.standardized_weight(), centred, atol=1e-6)
    # every fitted WS kernel has zero mean per channel (what WS can express)
    w = calibrated.net.get_submodule("layer1.0.conv2").standardized_weight()
    assert w.mean(dim=(1, 2, 3)).abs().max() < 1e-6
    with torch.no_grad():
        ref = resnet18(x)
        errs = {k: _rel(m(x), ref) for k, m in
                (("cov", calibrated), ("mean", mean_fit), ("none", plain))}  # fmt: skip
        ref_held = resnet18(held)
        held_cov, held_mean = _rel(calibrated(held), ref_held), _rel(mean_fit(held), ref_held)
    assert errs["cov"] == pytest.approx(calibrated.report.rel_error, rel=1e-6)
    # calibration shrinks the error; the covariance fit more than the mean fit, also on held-out
    assert errs["cov"] < errs["mean"] < errs["none"], errs
    assert held_cov < 0.7 * held_mean, (held_cov, held_mean)
    assert errs["cov"] < 0.5
    calibrated.train()
    assert _batch_dependence(calibrated, x) < 1e-5


@pytest.mark.parametrize("mode", ["gn", "gnpn"])
def test_gn_modes_take_bn_affine_and_are_batch_independent(resnet18, mode):
    x = _inputs()
    c = convert_model(resnet18, mode, x)
    norms = [m for m in c.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 20
    if mode == "gn":
        assert torch.equal(c.net.bn1.weight, resnet18.bn1.weight)
    else:  # bn1 → relu became GN (no affine) → PN-ReLU with BN's γ, β
        assert torch.equal(c.net.bn1.act.weight, resnet18.bn1.weight)
        assert torch.equal(c.net.bn1.act.bias, resnet18.bn1.bias)
    assert c.report.rel_error is not None and c.report.rel_error > 0
    c.train()
    assert _batch_dependence(c, x) < 1e-4


def test_save_load_round_trip(resnet18, tmp_path):
    c = convert_model(resnet18, "nf", source="torchvision:resnet18",
                      source_kwargs={"num_classes": 10})  # fmt: skip
    x = _inputs(3)
    for suffix in (".safetensors", ".pt"):
        path = tmp_path / f"m{suffix}"
        save_converted(c, path)
        loaded = load_converted(path)
        assert isinstance(loaded, ConvertedModel)
        with torch.no_grad():
            assert torch.equal(loaded(x), c(x))
    obj = torch.load(tmp_path / "m.pt", weights_only=True)  # a safe file: no pickled code
    assert obj["description"]["mode"] == "nf"


def test_save_needs_a_source_or_explicit_pickle(tmp_path):
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                nn.Flatten(), nn.LazyLinear(2)))  # fmt: skip
    c = convert_model(model, "bn_free")
    with pytest.raises(ConversionError, match="no source architecture"):
        save_converted(c, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    save_converted(c, tmp_path / "m.pt", allow_pickle=True)
    with pytest.raises(Exception, match=r"(?i)pickl|weights_only"):
        load_converted(tmp_path / "m.pt")
    assert isinstance(load_converted(tmp_path / "m.pt", trust_pickle=True), ConvertedModel)


def test_bad_inputs_name_the_module():
    with pytest.raises(ConversionError, match="no BatchNorm2d"):
        convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "bn_free")
    mlp = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ConversionError, match="BatchNorm1d '1'"):
        convert_model(mlp, "bn_free")
    pre = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3))
    with pytest.raises(ConversionError, match=r"BatchNorm2d '0' follows the model input.*affine"):
        convert_model(pre, "nf")
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ConversionError, match="'1' has no running statistics"):
        convert_model(no_stats, "bn_free")
    with pytest.raises(ConversionError, match="unknown mode"):
        convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "ln")


def test_standalone_bn_as_exact_affine():
    torch.manual_seed(0)
    pre = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)))  # fmt: skip
    x = _inputs()
    c = convert_model(pre, "bn_free", x, standalone_bn="affine")
    assert c.report.affine == 1 and sum(isinstance(m, ChannelAffine) for m in c.modules()) == 1
    assert c.report.rel_error < 1e-5


def test_normfree_bn_models_fold_into_their_own_convs(tmp_path):
    """normfree's BN models build their convs from ``HeConv2d`` (an ``nn.Conv2d`` that runs a
    1×1 as a matrix product): each BN after one folds into it and the residual branches are
    found. ``bn_resnet_cifar20`` is pre-activation: the BN of each block's input (and the final
    one) has no conv before it and stays an exact affine; the BN after the block's first conv
    folds. EfficientNet-B0 is Conv→BN throughout."""
    from normfree.models import create_model

    torch.manual_seed(0)
    model = _warm(create_model("bn_resnet_cifar20", num_classes=10), (4, 3, 16, 16), 2)
    c = convert_model(model, "bn_free", _inputs(), standalone_bn="affine")
    assert (c.report.norms, c.report.affine, c.report.residuals) == (19, 10, 9)
    assert c.report.rel_error < 1e-5
    assert c.description["source"] == "normfree:bn_resnet_cifar20"
    nf = convert_model(model, "nf", _inputs(), standalone_bn="affine")
    assert (nf.report.affine, nf.report.residuals, nf.report.calibrated) == (10, 9, True)
    assert sum(isinstance(m, ScaledStdConv2d) for m in nf.modules()) == 9
    save_converted(nf, tmp_path / "nf.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load_converted(tmp_path / "nf.safetensors")(_inputs()),
                                   nf(_inputs()), rtol=0, atol=0)  # fmt: skip

    effnet = _warm(create_model("efficientnet_b0_g1_bn", num_classes=10), (2, 3, 32, 32), 1)
    c = convert_model(effnet, "bn_free", _inputs(2, 32))  # no standalone BN to allow
    assert (c.report.norms, c.report.affine, c.report.residuals) == (49, 0, 9)
    assert c.report.rel_error < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in c.modules())


@pytest.mark.slow
def test_resnet50_all_modes():
    torch.manual_seed(0)
    model = _warm(torchvision.models.resnet50(num_classes=10))
    x = _inputs(4)
    for mode in ("bn_free", "nf", "gn", "gnpn"):
        c = convert_model(model, mode, x)
        assert c.report.residuals == 16  # found in every mode; given gains in bn_free / nf
        if mode == "bn_free":
            assert c.report.rel_error < 1e-5
        c.train()
        # float64: float32 rounding alone differs by ~1e-4 between batch sizes through 50
        # layers of GroupNorm over 1×1 maps (oneDNN blocks batch 1 and 4 differently), while a
        # real batch dependence (BN in train mode) is O(1)
        assert _batch_dependence(c.double(), x.double()) < 1e-10
