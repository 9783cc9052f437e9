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
