"""End to end through timm's registry: register normfree models, build one with
``timm.create_model`` as timm's train.py does, train a step, resolve its data config, group its
parameters for layer-wise LR decay and load a local weights file (skipped without timm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normfree

timm = pytest.importorskip("timm")
from timm.data import resolve_data_config  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

from normfree.integrations.timm import register_timm_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def names() -> list[str]:
    return register_timm_models()


def test_every_model_is_registered_once(names: list[str]) -> None:
    assert len(names) == len(normfree.list_models())
    assert set(timm.list_models("normfree_*")) == set(names)
    assert register_timm_models() == names  # idempotent
    with pytest.raises(ValueError, match="choose another prefix"):
        register_timm_models(prefix="")  # timm has its own nf_resnet50, nfnet_f0…


def test_timm_create_model_train_step_and_data_config(names: list[str]) -> None:
    torch.manual_seed(0)
    # the keywords timm's train.py passes (unset ones are None)
    model = timm.create_model(
        "normfree_nf_resnet_cifar20", pretrained=False, in_chans=3, num_classes=4, drop_rate=0.1,
        drop_path_rate=0.1, drop_block_rate=None, global_pool=None, bn_momentum=None,
        bn_eps=None, scriptable=False, checkpoint_path="",
    )  # fmt: skip
    assert model.num_classes == 4 and model.meta.stochdepth_rate == 0.1
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 3])
    opt = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(id(p) not in decayed for n, p in model.named_parameters() if p.ndim <= 1)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert F.cross_entropy(model(x), y).item() != loss.item()

    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == 1.0
    nfnet = timm.create_model("normfree_nfnet_f0", depths=(1, 1, 1, 1),
                              widths=(32, 64, 96, 96), group_size=8)  # fmt: skip
    assert resolve_data_config({}, model=nfnet)["input_size"] == (3, 192, 192)
    test = resolve_data_config({}, model=nfnet, use_test_size=True)
    assert test["input_size"] == (3, 256, 256) and test["interpolation"] == "bicubic"
    assert int(256 / test["crop_pct"]) == 288

    # layer-wise LR decay reads group_matcher: stem < blocks < final/head
    opt = create_optimizer_v2(nfnet, "sgd", lr=0.1, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    stem = scale[id(nfnet.stem.conv1.weight)]
    first = scale[id(nfnet.stages[0][0].conv1.weight)]
    last = scale[id(nfnet.stages[3][0].conv1.weight)]
    head = scale[id(nfnet.head.fc.weight)]
    assert stem < first < last < head == 1.0
    assert first / stem == pytest.approx(2.0)


def test_timm_features_only_and_local_pretrained_file(names: list[str], tmp_path) -> None:
    torch.manual_seed(0)
    source = normfree.create_model("nf_resnet_cifar20")
    path = tmp_path / "nf.pth"
    normfree.save_model(source, path)
    model = timm.create_model("normfree_nf_resnet_cifar20", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(path)))  # fmt: skip
    assert torch.equal(model.stem.conv.weight, source.stem.conv.weight) and model.num_classes == 0
    with pytest.raises(ValueError, match="local weights file"):
        timm.create_model("normfree_nf_resnet_cifar20", pretrained=True)
    feats = timm.create_model("normfree_nf_resnet_cifar20", features_only=True, out_indices=2)
    out = feats(torch.randn(1, 3, 16, 16))
    assert [t.shape[1] for t in out] == feats.feature_info.channels() == [32, 64]
