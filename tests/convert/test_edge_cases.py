"""Models at the edges of what conversion handles: each is converted exactly, or refused in one
message naming the problem, and a file always rebuilds the model it was saved from."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normfree
from bn_stats import warm_bn
from normfree.convert import ChannelAffine, ConversionError, ConvertedModel, convert_model
from normfree.convert.modes import ConvertOptions
from normfree.nn import ScaledStdConv2d, SkipInitGain

_warm = warm_bn


def _x(n: int = 4, size: int = 16, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=gen).to(dtype) * 2 + 0.5


def test_a_file_always_rebuilds_the_model_it_was_saved_from(tmp_path):
    """A normfree model built with an option the inferred source does not record (a stride)
    rebuilds with other layer settings: saving it is refused rather than written as a file
    that loads as another model; with allow_pickle it is written as a pickled module."""
    model = _warm(normfree.create_model("bn_resnet_cifar20", num_classes=4, depths=(1, 1, 1),
                                        strides=(1, 1, 2)))  # fmt: skip
    c = convert_model(model, "bn_free", _x(), standalone_bn="affine",
                      source_kwargs={"depths": [1, 1, 1]})  # all but the strides  # fmt: skip
    with pytest.raises(ConversionError, match=r"does not rebuild this model \(its layers or"):
        normfree.convert.save_converted(c, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    normfree.convert.save_converted(c, tmp_path / "m.pt", allow_pickle=True)
    back = normfree.convert.load_converted(tmp_path / "m.pt", trust_pickle=True)
    with torch.no_grad():
        assert torch.equal(back(_x()), c(_x()))
    from normfree.convert.experiment import bn_resnet_small

    wide = _warm(bn_resnet_small(num_classes=2, in_chans=3, width=8))
    spec = "normfree.convert.experiment:bn_resnet_small"
    c = convert_model(wide, "bn_free", source=spec, source_kwargs={"num_classes": 2,
                                                                 "in_chans": 3, "width": 4})
    with pytest.raises(ConversionError, match=r"does not rebuild this model \(\d+ tensors differ"):
        normfree.convert.save_converted(c, tmp_path / "w.pt")


def test_a_conv_whose_weight_is_also_read_directly_is_refused():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), \
                nn.Linear(8, 2)  # fmt: skip

        def forward(self, x):
            a = self.bn(self.conv(x))
            b = F.conv2d(x, self.conv.weight, padding=2, dilation=2)
            return self.fc(torch.cat([a, b], 1).mean((2, 3)))

    for mode in ("bn_free", "gn"):
        with pytest.raises(ConversionError, match=r"'conv' also has conv\.weight read directly"):
            convert_model(_warm(Tied()), mode)


def test_nf_keeps_a_conv_with_a_fan_in_of_one_plain_and_folded():
    """Weight Standardization of a one-weight kernel is 0; such a conv keeps its folded weight
    (exact, and it still learns) while the other convs become Scaled-WS."""
    model = _warm(nn.Sequential(
        nn.Conv2d(3, 3, 1, groups=3), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2),
    ))  # fmt: skip
    c = convert_model(model, "nf", _x())
    kinds = [type(m) for m in c.net.modules() if isinstance(m, nn.Conv2d)]
    assert kinds == [nn.Conv2d, ScaledStdConv2d]
    first = next(m for m in c.net.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        torch.testing.assert_close(first(_x()), model[1](model[0](_x())), rtol=1e-5, atol=1e-5)
    c.train()
    c(_x()).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in c.parameters())


@pytest.mark.parametrize("mode", ["bn_free", "nf", "gn", "gnpn"])
def test_a_float64_model_converts_to_float64_and_a_meta_model_on_meta(mode):
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),
            nn.Flatten(), nn.LazyLinear(2),
        )  # fmt: skip

    model = build().double()
    model(_x(dtype=torch.float64))
    model = _warm(model)
    c = convert_model(model, mode, _x(dtype=torch.float64), standalone_bn="affine")
    assert {p.dtype for p in c.parameters()} == {torch.float64}
    if mode == "bn_free":
        assert c.report.rel_error < 1e-12
    with torch.device("meta"):
        meta = build()
        meta(torch.empty(1, 3, 16, 16))
    converted = convert_model(meta, mode, standalone_bn="affine")
    assert {p.device.type for p in converted.parameters()} == {"meta"}
    assert any(isinstance(m, (ChannelAffine, nn.GroupNorm, SkipInitGain))
               for m in converted.modules())  # fmt: skip


def test_a_model_whose_output_is_not_a_tensor_is_a_clear_error():
    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return {"out": self.bn(self.conv(x))}

    with pytest.raises(ConversionError, match="returns a dict, not a tensor"):
        convert_model(_warm(Dict()), "bn_free", _x())

    class Ordered(Dict):
        def forward(self, x):
            return __import__("collections").OrderedDict(out=self.bn(self.conv(x)))

    with pytest.raises(ConversionError, match="returns an OrderedDict, not a tensor"):
        convert_model(_warm(Ordered()), "bn_free", _x())


def test_example_batches_of_different_image_sizes_are_a_conversion_error():
    """A list of calibration batches is concatenated: batches of different sizes used to end in
    torch.cat's raw RuntimeError."""
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    batches = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 20, 20)]
    shapes = r"different \(C, H, W\): \[3, 16, 16\], \[3, 20, 20\]"
    with pytest.raises(ConversionError, match=shapes):
        convert_model(model, "bn_free", batches)
    with pytest.raises(ConversionError, match=r"an image batch .* or a list of them"):
        convert_model(model, "bn_free", [])
    same = convert_model(model, "bn_free", [torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)])
    assert same.report.rel_error < 1e-5


def test_a_non_square_example_keeps_the_sources_square_size(tmp_path):
    """The meta's sizes are square: a (20, 12) calibration batch used to be recorded as a
    12 px model. Now a square example names the size, a non-square one leaves the source's own
    (``test_size``) and the description keeps the example's (H, W), through a file too."""
    from normfree.convert import load_converted, save_converted
    from normfree.models import create_model

    torch.manual_seed(0)
    model = _warm(create_model("bn_resnet_cifar20", num_classes=10), (4, 3, 16, 16), 1)
    declared = model.meta.test_size
    wide = convert_model(model, "bn_free", torch.randn(2, 3, 20, 12), standalone_bn="affine")
    assert (wide.meta.test_size, wide.meta.train_size) == (declared, declared)
    assert wide.description["image_size"] == declared
    assert wide.description["example_size"] == [20, 12]
    save_converted(wide, tmp_path / "wide.safetensors")
    back = load_converted(tmp_path / "wide.safetensors")
    assert back.description["example_size"] == [20, 12]
    assert back.meta.test_size == declared

    square = convert_model(model, "bn_free", torch.randn(2, 3, 24, 24), standalone_bn="affine")
    assert square.meta.test_size == 24 and square.description["example_size"] == [24, 24]
    assert "example_size" not in convert_model(model, "bn_free", standalone_bn="affine").description


def test_modules_the_eval_forward_never_calls_are_reported():
    """torchvision's GoogLeNet calls its auxiliary heads only in training: the trace (eval)
    has no copy of them, and the report says so."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True,
                                         num_classes=3).eval()  # fmt: skip
    c = convert_model(model, "bn_free", _x(2, 32))
    assert c.report.dropped == ["aux1", "aux2"]
    assert "never calls them" in c.report.summary() and "aux1, aux2" in c.report.summary()
    plain = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                         num_classes=3).eval()  # fmt: skip
    assert convert_model(plain, "bn_free").report.dropped == []


def test_segmentation_sources_build_without_downloading_a_backbone(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    from normfree.convert.sources import build_source

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = build_source("torchvision:lraspp_mobilenet_v3_large", {"num_classes": 3})
    assert isinstance(model, torchvision.models.segmentation.LRASPP)


def test_options_must_be_finite_numbers_and_a_model_without_classifier_says_so():
    for key, value in (("residual_alpha", float("inf")), ("nf_shrinkage", float("nan")),
                       ("residual_alpha", "0.5"), ("residual_alpha", True)):  # fmt: skip
        with pytest.raises(ValueError, match=f"{key} must be a positive finite number"):
            ConvertOptions(**{key: value})
    headless = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    c = convert_model(headless, "bn_free")
    assert isinstance(c, ConvertedModel) and c.num_classes is None


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "size"),
    [(3, 1, 1, 1, 9), (7, 2, 3, 1, 20), (3, 2, 2, 2, 13), (1, 1, 0, 1, 6),
     ((3, 1), (2, 1), (1, 0), (1, 1), 11)],
)  # fmt: skip
def test_calibration_samples_the_patches_that_unfolding_all_would_give(
    kernel, stride, padding, dilation, size
):
    """The NF calibration gathers only the sampled patch positions; they equal the rows of the
    full ``F.unfold`` that the same permutation picks, bit for bit."""
    from normfree.convert.modes import sampled_patches

    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(2))
    cols = F.unfold(x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    for take in (17, rows.shape[0]):
        pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:take]
        expected = rows[pick] if take < rows.shape[0] else rows
        got = sampled_patches(x, conv, take, torch.Generator().manual_seed(0))
        assert torch.equal(got, expected)


def test_nf_scales_branches_that_end_in_timms_batchnormact_by_alpha():
    """timm's BatchNormAct2d leaves a drop → act tail (both Identity at a branch end) after the
    WS conv: α goes past it, so every residual branch gets α, and the function is unchanged."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=3).eval()
    x = _x(2, 32)
    plain = convert_model(model, "nf", x, residual_alpha=1.0)
    scaled = convert_model(model, "nf", x, residual_alpha=0.2)
    alphas = [n for n in scaled.net.graph.nodes if n.op == "call_function" and n.args[-1] == 0.2]
    assert len(alphas) == scaled.report.residuals > 0
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), plain(x), rtol=1e-5, atol=1e-6)


def test_bn_free_keeps_a_reflect_padded_conv_exactly_and_the_ws_modes_refuse_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))  # fmt: skip
    model(_x(1))
    model = _warm(model)
    c = convert_model(model, "bn_free", _x())
    assert c.report.rel_error < 1e-5
    assert [m.padding_mode for m in c.modules() if isinstance(m, nn.Conv2d)] == ["reflect"]
    for mode in ("nf", "gn"):
        with pytest.raises(ConversionError, match="padding_mode='reflect'; this mode's convs"):
            convert_model(model, mode)


def test_an_untraceable_model_is_refused_naming_the_module_that_branches():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # control flow on a tensor value

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(Branchy()))
    with pytest.raises(ConversionError, match=r"with torch\.fx in Branchy '2\.0' \(TraceError"):
        convert_model(model, "bn_free")


def test_a_torch_compile_wrapper_is_refused_and_an_in_place_compiled_model_converts():
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    # the wrapper's forward is not the network's; fx used to fail on it with its own internals
    with pytest.raises(ConversionError, match=r"returned by torch\.compile: convert the module"):
        convert_model(torch.compile(model), "bn_free")
    model.compile()  # compiles in place on the first call; fx still traces the module's forward
    converted = convert_model(model, "bn_free", _x())
    assert converted.report.norms == 1
    eager = nn.Sequential(*model).eval()  # the same layers, not compiled (no compile in a test)
    torch.testing.assert_close(converted(_x()), eager(_x()), rtol=1e-5, atol=1e-6)


def test_a_torchvision_regnet_saves_and_loads_although_its_builder_cannot_run_on_meta(tmp_path):
    """torchvision's RegNet builders compute their widths from tensor values (``.tolist()``),
    which the meta device cannot do: the rebuild check falls back to a real build instead of
    refusing every torchvision RegNet."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    kwargs = {"num_classes": 3}
    model = _warm(torchvision.models.regnet_x_400mf(**kwargs))
    c = convert_model(model, "bn_free", _x(), source="torchvision:regnet_x_400mf",
                      source_kwargs=kwargs)  # fmt: skip
    for suffix in (".safetensors", ".pt"):
        normfree.convert.save_converted(c, tmp_path / f"r{suffix}")
        back = normfree.convert.load_converted(tmp_path / f"r{suffix}")
        with torch.no_grad():
            assert torch.equal(back(_x()), c(_x()))


def _frozen_values(model: nn.Module) -> nn.Module:
    """Move every frozen BN's buffers off their init (identity statistics would hide errors)."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.startswith("FrozenBatchNorm"):
                c = m.running_mean.numel()
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model.eval()


def test_frozen_batchnorms_convert_like_the_batchnorms_they_froze(tmp_path):
    """torchvision's FrozenBatchNorm2d (detection backbones, timm's freeze_batch_norm_2d) and
    timm's FrozenBatchNormAct2d are BN sites: bn_free folds them exactly, the GN modes replace
    them; they were refused as "no BatchNorm2d: nothing to convert"."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = _frozen_values(torchvision.models.resnet18(num_classes=3, norm_layer=FrozenBatchNorm2d))
    x = _x()
    with torch.no_grad():
        ref = model(x)
    c = convert_model(model, "bn_free", x, source="torchvision:resnet18",
                      source_kwargs={"num_classes": 3})  # fmt: skip
    assert c.report.norms == 20 and c.report.residuals == 8 and c.report.rel_error < 1e-5
    assert not any("Frozen" in type(m).__name__ for m in c.modules())
    normfree.convert.save_converted(c, tmp_path / "r.safetensors")  # same layers as unfrozen
    with torch.no_grad():
        assert torch.equal(normfree.convert.load_converted(tmp_path / "r.safetensors")(x), c(x))
    gn = convert_model(model, "gn", x)
    assert not any("Frozen" in type(m).__name__ for m in gn.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in gn.modules()) == 20

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("mobilenetv3_small_050", num_classes=3)
    net = _frozen_values(timm.layers.freeze_batch_norm_2d(net))
    assert any(type(m).__name__ == "FrozenBatchNormAct2d" for m in net.modules())
    with torch.no_grad():
        ref = net(x)
    for mode in ("bn_free", "nf", "gnpn"):
        c = convert_model(net, mode, x)
        assert not any("Frozen" in type(m).__name__ for m in c.modules()), mode
        assert c.report.norms == 34, mode
    with torch.no_grad():
        out = convert_model(net, "bn_free", x)(x)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_a_functional_batch_norm_of_a_weight_is_weight_standardization_not_a_bn_site():
    """timm's StdConv2d standardizes its weight with F.batch_norm: that call reads no activation,
    so it is no BN site. A BN after such a conv converts (as an exact affine), and a model with
    no BN (timm's NF-ResNets, BiT) is "nothing to convert", not "replace the functional call"."""
    timm = pytest.importorskip("timm")
    from timm.layers import StdConv2d

    torch.manual_seed(0)
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), StdConv2d(4, 4, 3),
                                nn.BatchNorm2d(4), nn.ReLU()))  # fmt: skip
    x = _x()
    with torch.no_grad():
        ref = model(x)
    c = convert_model(model, "bn_free", x, standalone_bn="affine")
    assert c.report.norms == 2 and c.report.affine == 1
    with torch.no_grad():
        torch.testing.assert_close(c(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConversionError, match="NormFreeNet has no BatchNorm2d: there is nothing"):
        convert_model(timm.create_model("nf_resnet26", num_classes=2), "bn_free")

    class Functional(nn.Module):  # on activations it is still refused
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(self.conv(x), self.mean, self.var)

    with pytest.raises(ConversionError, match="functional batch_norm call 'batch_norm'"):
        convert_model(Functional(), "bn_free")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_float64_converted_model_loads_back_in_float64(tmp_path, suffix):
    """load_converted rebuilt the source in float32 and cast the file's float64 tensors into it:
    the model came back in float32, its outputs rounded."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _warm(torchvision.models.resnet18(num_classes=3).double(), (4, 3, 16, 16))
    x = _x(dtype=torch.float64)
    c = convert_model(model, "bn_free", x, source="torchvision:resnet18",
                      source_kwargs={"num_classes": 3})  # fmt: skip
    normfree.convert.save_converted(c, tmp_path / f"m{suffix}")
    back = normfree.convert.load_converted(tmp_path / f"m{suffix}")
    assert {t.dtype for t in back.state_dict().values() if t.is_floating_point()} == {torch.float64}
    with torch.no_grad():
        assert torch.equal(back(x), c(x))


@pytest.mark.parametrize("affine", [True, False])
def test_a_bn_without_running_statistics_converts_to_the_gn_modes(affine):
    """The GN modes take only a BN's γ and β, so a BN with track_running_stats=False (batch
    statistics even in eval) converts to them; only the modes that fold running statistics
    refuse it, naming the GN modes. It was refused in every mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False, affine=affine),
        nn.ReLU(), nn.BatchNorm2d(8, track_running_stats=False, affine=affine),
        nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()  # fmt: skip
    if affine:
        with torch.no_grad():
            model[1].weight.uniform_(0.5, 1.5)
            model[1].bias.uniform_(-0.3, 0.3)
    x = _x()
    for mode in ("bn_free", "nf"):
        with pytest.raises(ConversionError, match=r"'1' has no running statistics.*mode 'gn' or"):
            convert_model(model, mode, standalone_bn="affine")
    for mode in ("gn", "gnpn"):
        c = convert_model(model.double(), mode, x.double())
        assert c.report.norms == 2 and {p.dtype for p in c.parameters()} == {torch.float64}
        norms = [m for m in c.modules() if isinstance(m, nn.GroupNorm)]
        assert len(norms) == 2
        if affine:  # the first BN's γ reaches its replacement
            assert any(torch.equal(p, model[1].weight) for p in c.parameters())
        with torch.no_grad():
            whole = c(x.double())
            alone = torch.cat([c(x[i : i + 1].double()) for i in range(len(x))])
        assert torch.allclose(whole, alone, rtol=1e-10, atol=1e-12)
        model.float()


def test_a_bn_after_a_same_padded_conv_folds_into_it_at_every_input_size(tmp_path):
    """timm's tf_* models pad "SAME" per input size (Conv2dSame): torch.fx could not trace them
    ("cannot trace EfficientNet ... in Conv2dSame 'conv_stem'"). The conv is now one leaf call,
    bn_free folds its BN into it (still "SAME", exact at any size), the GN modes keep it, and nf
    names the conv unless the BN is kept as an affine."""
    from normfree.nn.padding import Conv2dSame

    torch.manual_seed(0)
    model = _warm(nn.Sequential(Conv2dSame(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8),
                                nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)))  # fmt: skip
    c = convert_model(model, "bn_free", _x())
    assert c.report.norms == 2 and c.report.affine == 0
    assert isinstance(c.net.get_submodule("0"), Conv2dSame)
    for size in (15, 16):  # "SAME" pads differently at odd and even sizes
        x = torch.randn(2, 3, size, size + 3)
        with torch.no_grad():
            torch.testing.assert_close(c(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConversionError, match=r"follows Conv2dSame '0', which pads \"SAME\""):
        convert_model(model, "nf", _x())
    nf = convert_model(model, "nf", _x(), standalone_bn="affine")
    assert nf.report.affine == 1 and isinstance(nf.net.get_submodule("0"), Conv2dSame)
    gn = convert_model(model, "gn", _x())
    assert isinstance(gn.net.get_submodule("0"), Conv2dSame)

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = _warm(timm.create_model("tf_mobilenetv3_small_minimal_100", num_classes=3))
    kwargs = {"num_classes": 3}
    c = convert_model(net, "bn_free", _x(), source="timm:tf_mobilenetv3_small_minimal_100",
                      source_kwargs=kwargs)  # fmt: skip
    assert c.report.norms == 34 and c.report.rel_error < 1e-5
    x = torch.randn(2, 3, 33, 35)
    with torch.no_grad():
        assert float((c(x) - net(x)).norm() / net(x).norm()) < 1e-5
    normfree.convert.save_converted(c, tmp_path / "tf.safetensors")
    with torch.no_grad():
        back = normfree.convert.load_converted(tmp_path / "tf.safetensors")
        assert torch.equal(back(x), c(x))
