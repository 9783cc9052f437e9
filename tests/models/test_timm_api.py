"""timm's model API on one small model of every family: create_model keywords, classifier reset
and pooling, forward_intermediates == features_only extractor, pruning, group_matcher,
pretrained_cfg, weight files, and torch.fx traces equal to eager."""

from __future__ import annotations

import re

import pytest
import torch
import torch.fx

import normfree
from normfree.models import FeatureInfo, create_model

SHORT = dict(depths=(1, 1, 1))  # one block per stage of the small-image ResNets

# one small model per family: (registered name, overrides shrinking it, image size)
FAMILIES = {
    "nf_resnet": ("nf_resnet_cifar20", SHORT, 8),
    "nfnet": ("nfnet_f0", dict(depths=(1, 1, 1, 1), widths=(32, 64, 96, 96), group_size=8,
                               stem_channels=(8, 8, 8)), 32),
    "nf_regnet": ("nf_regnet_b0", dict(depths=(1, 1, 1, 1), widths=(16, 32, 48, 64)), 33),
    "efficientnet": ("efficientnet_b0_g16_gn", dict(width=0.25, depth=0.25, head_channels=64),
                     32),
    "bn_resnet": ("bn_resnet_cifar20", SHORT, 8),
    "wsgn_resnet": ("wsgn_resnet_cifar20", SHORT, 8),
    "gnpn_resnet": ("gnpn_resnet_cifar20", SHORT, 8),
    "skipinit_resnet": ("skipinit_resnet_cifar20", SHORT, 8),
    "fixup_resnet": ("fixup_resnet_cifar20", SHORT, 8),
    "msr_resnet": ("msr_resnet_cifar20", SHORT, 8),
}
IDS = list(FAMILIES)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _build(family: str, seed: int = 0, **kwargs):
    name, small, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return create_model(name, **{**small, **kwargs})


def _image(family: str, n: int = 2) -> torch.Tensor:
    size = FAMILIES[family][2]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _perturb(model: torch.nn.Module) -> None:
    """Non-zero residual gains and classifier, so every layer changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("family", IDS)
def test_create_model_keywords_have_timm_meaning(family: str) -> None:
    model = _build(family, pretrained=False, num_classes=0, global_pool="", drop_rate=0.3,
                   drop_path_rate=0.1).eval()  # fmt: skip
    x = _image(family)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
    # num_classes=0 + global_pool='': the unpooled feature map comes out
    assert out.shape == feats.shape and out.shape[1] == model.num_features
    assert torch.equal(out, feats)
    assert model.meta.stochdepth_rate == 0.1 and model.head.drop_rate == 0.3
    rates = [m.drop_rate for m in model.modules() if type(m).__name__ == "StochasticDepth"]
    assert rates and max(rates) == pytest.approx(0.1 * (len(rates) - 1) / len(rates))
    # reset_classifier(num_classes, global_pool) as timm: None keeps the pooling
    with pytest.raises(ValueError, match="global_pool=''"):
        model.reset_classifier(4)
    model.reset_classifier(4, "avg")
    assert model.get_classifier().out_features == 4 and model.get_classifier(True) == "head.fc"
    with torch.no_grad():
        assert model(x).shape == (2, 4)
        model.reset_classifier(0, "catavgmax")
        pooled = model(x)
    assert model.head_hidden_size == 2 * model.num_features == pooled.shape[1]
    assert torch.allclose(pooled[:, : model.num_features], feats.mean((2, 3)), atol=1e-6)
    assert torch.equal(pooled[:, model.num_features :], feats.amax((2, 3)))


@pytest.mark.parametrize("family", IDS)
def test_forward_intermediates_equal_the_features_only_extractor(family: str) -> None:
    model = _build(family).eval()
    _perturb(model)
    x = _image(family)
    infos = model.feature_info
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        ref = model.forward_features(x)
        assert torch.equal(final, ref)
        assert len(inter) == len(infos) == len(model.stages) + 1
        for t, info in zip(inter, infos):
            assert t.shape[1] == info["num_chs"] == info.num_chs
            assert x.shape[-1] // info["reduction"] in (t.shape[-1], t.shape[-1] - 1)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        for a, b in zip(last_two, inter[-2:]):
            assert torch.equal(a, b)
        early, taken = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
        assert torch.equal(early, inter[1])
        assert len(taken) == 2 and taken[1] is early
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        assert torch.equal(normed[0], ref)

    extractor = _build(family, features_only=True, out_indices=(1, -1)).eval()
    extractor.model.load_state_dict(model.state_dict(), strict=False)
    assert extractor.out_indices == (1, len(infos) - 1)
    assert extractor.feature_info.channels() == [infos[1]["num_chs"], infos[-1]["num_chs"]]
    assert extractor.feature_info.reduction() == [infos[1]["reduction"], infos[-1]["reduction"]]
    with torch.no_grad():
        feats = extractor(x)
        only = model.forward_intermediates(x, indices=(1, -1), intermediates_only=True)
    assert len(feats) == 2
    for a, b, c in zip(feats, only, (inter[1], inter[-1])):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
    # the extractor lost the classifier: no head parameters left
    assert not [n for n, _ in extractor.named_parameters() if ".head." in n]


@pytest.mark.parametrize("family", IDS)
def test_fx_trace_equals_eager(family: str) -> None:
    model = _build(family, drop_path_rate=0.2)
    _perturb(model)
    x = _image(family)
    for training in (False, True):
        model.train(training)
        graph = torch.fx.symbolic_trace(model)
        torch.manual_seed(3)
        eager = model(x)
        torch.manual_seed(3)
        traced = graph(x)
        # equal up to float rounding: where a traced block cannot use the folded-scale form
        # (normfree.nn.residual, issue 11) it runs the plain form, the same maths
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
    # the input check survives tracing
    with pytest.raises(ValueError, match="input channels"):
        graph(x[:, :2])


@pytest.mark.parametrize("family", IDS)
def test_prune_intermediate_layers_keeps_the_maps_it_returns(family: str) -> None:
    model = _build(family).eval()
    _perturb(model)
    x = _image(family)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
    kept = model.prune_intermediate_layers([0, 2])
    assert kept == [0, 2] and len(model.stages) == 2 and model.num_classes == 0
    assert model.num_features == model.feature_info[2]["num_chs"]
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=kept, intermediates_only=True)
        out = model(x)
    assert torch.equal(pruned[0], full[0])
    assert torch.equal(pruned[1], full[2])
    assert torch.equal(out, full[2])  # no pooling, no final layer


@pytest.mark.parametrize("family", IDS)
def test_group_matcher_no_weight_decay_and_pretrained_cfg(family: str) -> None:
    model = _build(family)
    names = [n for n, _ in model.named_parameters()]
    fine, coarse = model.group_matcher(), model.group_matcher(coarse=True)
    block_re = re.compile(fine["blocks"][0][0])
    stage_re = re.compile(coarse["blocks"][0][0])
    blocks = {block_re.match(n).groups() for n in names if block_re.match(n)}
    assert len(blocks) == sum(len(s) for s in model.stages)
    assert {stage_re.match(n).groups() for n in names if stage_re.match(n)} == {
        (str(i),) for i in range(len(model.stages))
    }
    groups = [fine["stem"], fine["blocks"][0][0], fine["blocks"][1][0], r"^head\."]
    unmatched = [n for n in names if not any(re.match(g, n) for g in groups)]
    assert not unmatched  # every parameter belongs to stem, a block, final or the head

    # timm's name for the family's rule (NF: gains, biases, scalars; Fixup decays everything)
    no_decay = model.no_weight_decay()
    assert no_decay == model.no_weight_decay_names() and no_decay <= set(names)

    cfg = model.pretrained_cfg
    meta = model.meta
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (3, meta.train_size, meta.train_size)
    assert cfg["test_input_size"] == (3, meta.test_size, meta.test_size)
    assert cfg["architecture"] == meta.name and cfg["classifier"] == "head.fc"
    assert cfg["num_classes"] == model.num_classes
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    last = model.feature_info[-1]["reduction"]
    assert cfg["pool_size"] == (-(-meta.train_size // last),) * 2
    if meta.small_image:
        assert cfg["crop_pct"] == 1.0 and cfg["mean"] == (0.4914, 0.4822, 0.4465)
    else:
        assert cfg["crop_pct"] == meta.train_size / (meta.train_size + 32)
        assert cfg["interpolation"] == "bicubic" and cfg["mean"] == (0.485, 0.456, 0.406)


def test_nfnet_f0_data_config_is_the_papers() -> None:
    """F0 trains at 192 px and is evaluated at 256 px after resizing to 288 (Brock et al.
    2021b, Table 2; official ``resize_crop_32``)."""
    cfg = _build("nfnet").pretrained_cfg  # F0's meta with small widths
    assert cfg["input_size"] == (3, 192, 192) and cfg["test_input_size"] == (3, 256, 256)
    assert int(256 / cfg["test_crop_pct"]) == 288 and int(192 / cfg["crop_pct"]) == 224
    assert cfg["pool_size"] == (6, 6) and cfg["test_pool_size"] == (8, 8)


def test_feature_info_entries_are_timm_dicts() -> None:
    model = _build("nf_resnet")
    info = model.feature_info
    assert info[0]["num_chs"] == 16 and info[0]["module"] == "stem" and info[-1].reduction == 4
    assert info.channels() == [16, 16, 32, 64] and info.reduction() == [1, 1, 2, 4]
    assert info.module_name(1) == "stages.0" and info.get_dicts(idx=0)["num_chs"] == 16
    assert FeatureInfo("stem", 3, 1) == {"module": "stem", "num_chs": 3, "reduction": 1}


def test_feature_info_takes_any_sequence_of_indices() -> None:
    # idx is annotated int | Sequence[int]: a range or another sequence reads several entries
    info = _build("nf_resnet").feature_info
    assert info.channels(range(2)) == info.channels([0, 1]) == [16, 16]
    assert info.get_dicts(["num_chs"], idx=range(1, 3)) == [{"num_chs": 16}, {"num_chs": 32}]


def test_pretrained_loads_a_local_file_the_timm_way(tmp_path) -> None:
    source = _build("nf_resnet", seed=5)
    _perturb(source)
    path = tmp_path / "w.safetensors"
    normfree.save_model(source, path)
    with pytest.raises(ValueError, match=r"pretrained_cfg_overlay=dict\(file=PATH\)"):
        create_model("nf_resnet_cifar20", pretrained=True, **SHORT)
    with pytest.raises(ValueError, match="downloads nothing"):
        create_model("nf_resnet_cifar20", pretrained=True, pretrained_cfg_overlay=dict(url="x"),
                     **SHORT)
    model = create_model("nf_resnet_cifar20", pretrained=True,
                         pretrained_cfg_overlay=dict(file=str(path)), **SHORT)  # fmt: skip
    assert model.pretrained_cfg["file"] == str(path)
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    # another class count: the pretrained trunk with a fresh classifier (timm's rule)
    torch.manual_seed(0)
    model3 = create_model("nf_resnet_cifar20", pretrained=True, num_classes=3,
                          pretrained_cfg=dict(file=str(path)), **SHORT)  # fmt: skip
    assert model3.num_classes == 3 and model3.pretrained_cfg["num_classes"] == 10
    assert torch.equal(model3.stages[2][0].conv1.weight, source.stages[2][0].conv1.weight)
    # checkpoint_path loads after creation, strictly
    model_ck = create_model("nf_resnet_cifar20", checkpoint_path=path, **SHORT)
    assert torch.equal(model_ck.head.fc.weight, source.head.fc.weight)
    x = _image("nf_resnet")
    with torch.no_grad():
        assert torch.equal(model_ck.eval()(x), source.eval()(x))


def test_bad_timm_arguments_fail_clearly() -> None:
    name = "nf_resnet_cifar20"
    cases = [
        (dict(drop_block_rate=0.1), "DropBlock"),
        (dict(output_stride=16), "output_stride"),
        (dict(num_classes=5, global_pool=""), "needs num_classes=0"),
        (dict(global_pool="median"), "global_pool must be one of"),
        (dict(out_indices=(1,)), "features_only"),
        (dict(features_only=True, out_indices=(7,)), "out of range"),
        (dict(drop_path_rate=0.1, stochdepth_rate=0.2), "disagree"),
        (dict(pretrained_cfg="in22k"), "no pretrained tag"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            create_model(name, **kwargs)
    with pytest.raises(TypeError, match="keyword"):
        create_model(name, 10)
    with pytest.raises(ValueError, match="num_classes must be an int >= 0, got True"):
        create_model(name, num_classes=True)
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0, got 2\.5"):
        create_model(name).reset_classifier(2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a model name must be a str, got NoneType"):
        create_model(None)
    with pytest.raises(TypeError, match="pattern must be a str or a list of str, got int"):
        normfree.list_models(5)
    # unset timm options (None) are ignored, as timm's create_model does
    model = create_model(name, drop_block_rate=None, bn_momentum=None, cache_dir=None)
    assert model.meta.stochdepth_rate == 0.0
    assert create_model(name, stochdepth_rate=0.1).meta.stochdepth_rate == 0.1  # normfree alias


def test_reset_classifier_takes_the_models_dtype_and_device() -> None:
    """timm's ``reset_classifier`` makes the new classifier with the model's device and dtype
    (``get_device_dtype``): a float64 model, or one whose classifier was removed before it moved
    (no head parameters to copy the device from), keeps working."""
    x = _image("nf_resnet").double()
    model = _build("nf_resnet").double().eval()
    model.reset_classifier(5)
    assert model.head.fc.weight.dtype == torch.float64
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    model.reset_classifier(3, "catavgmax")
    assert model.head.fc.weight.dtype == torch.float64 and model(x).shape == (2, 3)
    headless = _build("nf_resnet", num_classes=0).to("meta")
    headless.reset_classifier(4)
    assert headless.head.fc.weight.device.type == "meta"


@pytest.mark.parametrize("family", ["nfnet", "nf_regnet", "efficientnet"])
def test_prune_norm_refits_the_head_to_the_last_map(family: str) -> None:
    """Without ``final`` (a channel-changing final conv in these families) the features are the
    last stage's: ``num_features`` / ``head_hidden_size`` say so, and a kept classifier of the
    old width goes instead of failing in the forward."""
    x = _image(family, n=1)
    model = _build(family).eval()
    last = model.feature_info[-1]["num_chs"]
    assert model.num_features != last  # the final conv widens the features
    with torch.no_grad():
        stage_out = model.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    model.prune_intermediate_layers(indices=1, prune_norm=True, prune_head=False)
    assert model.num_features == model.head_hidden_size == last and model.num_classes == 0
    with torch.no_grad():
        assert torch.equal(model(x), stage_out)
    model.reset_classifier(7, "avg")
    assert model.head.fc.in_features == last
    with torch.no_grad():
        assert model(x).shape == (1, 7)
    extractor = _build(family, features_only=True, out_indices=(-1,))
    assert extractor.model.num_features == extractor.feature_info.channels()[0] == last


def test_create_model_takes_timms_device_and_dtype() -> None:
    """timm's ``create_model(..., device=, dtype=)`` (timm >= 1.0.20) builds the parameters
    there and in that dtype, instead of a TypeError."""
    model = create_model("nf_resnet_cifar20", dtype=torch.float64, **SHORT)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(_image("nf_resnet").double()).dtype == torch.float64
    meta = create_model("nfnet_f0", device="meta", num_classes=3, **FAMILIES["nfnet"][1])
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert meta(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 3)


@pytest.mark.parametrize("family", IDS)
def test_meta_model_to_empty_and_reset_parameters_gives_the_fresh_init(family: str) -> None:
    """``create_model(device="meta")`` → ``to_empty`` → ``reset_parameters()`` (the deferred-init
    recipe) gives the classifier of a fresh model: N(0, 0.01²) weights (Brock et al. 2021a/b)
    or zeros (NF-RegNet, Fixup), zero bias, not ``nn.Linear``'s default uniform init, which
    used to run after the head's own reset and overwrite it."""
    fresh = _build(family, num_classes=500)
    model = _build(family, num_classes=500, device="meta").to_empty(device="cpu")
    model.reset_parameters()
    got, want = model.get_classifier(), fresh.get_classifier()
    assert torch.count_nonzero(got.bias) == 0
    if torch.count_nonzero(want.weight) == 0:
        assert torch.count_nonzero(got.weight) == 0
    else:
        assert got.weight.std().item() == pytest.approx(want.weight.std().item(), rel=0.05)
    # every other tensor is finite and has its fresh scale (same shapes, same init rules)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert torch.isfinite(b).all(), name
        if a.is_floating_point() and a.numel() >= 1024:
            assert b.std().item() == pytest.approx(a.std().item(), rel=0.2, abs=1e-6), name


@pytest.mark.parametrize("family", IDS)
def test_smallest_image_runs_and_empty_or_integer_images_are_clear_errors(family: str) -> None:
    """Every model takes any image from 1×1 up (odd, non-square sizes included); an empty image
    or an integer (uint8) batch is a ``ValueError`` naming the problem, not a conv's
    "Kernel size can't be greater than actual input size" or "expected scalar type Byte"."""
    model = _build(family).eval()
    with torch.no_grad():
        for h, w in ((1, 1), (1, 7), (13, 5)):
            out = model(torch.randn(1, 3, h, w))
            assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()
        with pytest.raises(ValueError, match="height and width must be at least 1 pixel"):
            model(torch.randn(1, 3, 0, 8))
        with pytest.raises(ValueError, match=r"floating-point image batch, got dtype torch\.uint8"):
            model(torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8))


def test_list_models_takes_timms_pattern_lists_and_exclude_filters() -> None:
    """timm's ``list_models(filter, exclude_filters=...)``: a list of patterns selects the names
    matching any of them, ``exclude_filters`` (a pattern or a list) removes names; both were a
    ``TypeError`` for a list."""
    assert normfree.list_models(["nfnet_f0*", "nf_regnet_b[01]"]) == [
        "nf_regnet_b0", "nf_regnet_b1", "nfnet_f0", "nfnet_f0_plus",
    ]  # fmt: skip
    assert normfree.list_models("nfnet_f*", exclude_filters="*_plus") == [
        f"nfnet_f{i}" for i in range(8)
    ]
    assert normfree.list_models("nfnet_f[01]*", exclude_filters=["*_plus", "*f1"]) == ["nfnet_f0"]
    assert normfree.list_models(exclude_filters="*") == []
    assert normfree.list_models([]) == normfree.list_models() == normfree.list_models("")
    with pytest.raises(TypeError, match="exclude_filters must be a str or a list of str"):
        normfree.list_models("nfnet*", exclude_filters=3)


def test_cfg_num_classes_and_input_channels_are_the_defaults_as_in_timm() -> None:
    # timm's _update_default_model_kwargs: without pretrained weights too, the cfg's num_classes
    # and input_size[0] are the defaults of num_classes and in_chans
    model = create_model("nf_resnet_cifar20", pretrained_cfg_overlay=dict(num_classes=100),
                         **SHORT)  # fmt: skip
    assert model.num_classes == model.pretrained_cfg["num_classes"] == 100
    model = create_model("nf_resnet_cifar20", pretrained_cfg=dict(input_size=(1, 32, 32)), **SHORT)
    assert model.in_chans == 1 and model.pretrained_cfg["input_size"] == (1, 32, 32)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # an explicit argument still wins; the cfg keeps describing the source weights
    model = create_model("nf_resnet_cifar20", num_classes=4, in_chans=2,
                         pretrained_cfg_overlay=dict(num_classes=100), **SHORT)  # fmt: skip
    assert model.num_classes == 4 and model.in_chans == 2
    assert model.pretrained_cfg["num_classes"] == 100
