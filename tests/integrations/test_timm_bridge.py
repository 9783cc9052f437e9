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


def _trained_like_nfnet(seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = normfree.create_model("nfnet_f0", num_classes=10, depths=(1, 1, 2, 1), **kwargs)
    with torch.no_grad():  # gains away from 1 and biases away from 0: a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("gain"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))


def test_timm_checkpoint_path_reads_timm_dm_nfnet_files(names: list[str], tmp_path) -> None:
    """``timm.create_model(..., checkpoint_path=)`` hands the file to timm's own loader, which
    calls ``model.load_state_dict`` with timm's key names (``final_conv``, ``skipinit_gain``,
    4-D gains): it used to fail with missing and unexpected keys."""
    from normfree.checkpoints import normfree_to_timm

    raw, ema = _trained_like_nfnet(0), _trained_like_nfnet(1)
    plain = tmp_path / "dm_nfnet.pth"
    torch.save(normfree_to_timm(raw.state_dict()), plain)
    model = timm.create_model("normfree_nfnet_f0", num_classes=10, depths=(1, 1, 2, 1),
                              checkpoint_path=str(plain))  # fmt: skip
    torch.testing.assert_close(_logits(model), _logits(raw), rtol=0, atol=0)
    # a checkpoint timm's train.py writes: timm's loader takes its EMA by default
    run = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 2, "state_dict": normfree_to_timm(raw.state_dict()),
                "state_dict_ema": normfree_to_timm(ema.state_dict())}, run)  # fmt: skip
    model = timm.create_model("normfree_nfnet_f0", num_classes=10, depths=(1, 1, 2, 1),
                              checkpoint_path=str(run))  # fmt: skip
    torch.testing.assert_close(_logits(model), _logits(ema), rtol=0, atol=0)
    # normfree's own layout passes the hook unchanged, and a wrong file still fails strictly
    model.load_state_dict(raw.state_dict())
    torch.testing.assert_close(_logits(model), _logits(raw), rtol=0, atol=0)
    other = normfree.create_model("nf_resnet_cifar20").state_dict()
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(other)


def test_timm_checkpoint_path_reads_deepmind_npz_files(names: list[str], tmp_path) -> None:
    """timm hands ``.npz`` files to ``model.load_pretrained(path)``: it used to raise
    NotImplementedError ("Model cannot load numpy checkpoint"). A flat archive loads; DeepMind's
    pickled ``F*_haiku.npz`` needs the opt-in, given by calling the method itself."""
    import pickle

    import numpy as np

    from normfree.checkpoints import CheckpointError, normfree_to_deepmind

    src = _trained_like_nfnet(0)
    tree = normfree_to_deepmind(src)
    flat = tmp_path / "F0_flat.npz"
    np.savez(flat, **{f"{module}/{param}": value
                      for module, params in tree.items() for param, value in params.items()})
    model = timm.create_model("normfree_nfnet_f0", num_classes=10, depths=(1, 1, 2, 1),
                              checkpoint_path=str(flat))  # fmt: skip
    torch.testing.assert_close(_logits(model), _logits(src), rtol=0, atol=0)

    haiku = tmp_path / "F0_haiku.npz"
    haiku.write_bytes(pickle.dumps(tree, protocol=4))
    with pytest.raises(CheckpointError, match=r"model\.load_pretrained\(PATH, trust_pickle=True\)"):
        timm.create_model("normfree_nfnet_f0", num_classes=10, depths=(1, 1, 2, 1),
                          checkpoint_path=str(haiku))  # fmt: skip
    model = timm.create_model("normfree_nfnet_f0", num_classes=10, depths=(1, 1, 2, 1))
    model.load_pretrained(str(haiku), trust_pickle=True)
    torch.testing.assert_close(_logits(model), _logits(src), rtol=0, atol=0)
    with pytest.raises(ValueError, match="prefix='model/' is not supported"):
        model.load_pretrained(str(flat), prefix="model/")


def test_timm_s_lookups_before_building_find_each_model_s_own_cfg(names: list[str], caplog) -> None:
    """timm's scripts resolve ``create_model``'s keywords from the registry before the model
    exists (``resolve_model_input_args``); with no registered cfg timm substituted its generic
    224 px / crop 0.875 one, which then overrode NFNet-F0's 192 px / 256 px test size."""
    from timm.models import get_pretrained_cfg_value, resolve_model_input_args

    assert get_pretrained_cfg_value("normfree_nfnet_f0", "input_size") == (3, 192, 192)
    assert get_pretrained_cfg_value("normfree_nfnet_f0", "first_conv") == "stem.conv1"
    assert get_pretrained_cfg_value("normfree_nf_resnet_cifar20", "num_classes") == 10
    assert timm.list_models("normfree_*", pretrained=True) == []  # no weights are registered
    with caplog.at_level("WARNING"):
        kwargs = resolve_model_input_args("normfree_nfnet_f0", {}, depths=(1, 1, 1, 1),
                                          widths=(32, 64, 96, 96), group_size=8)  # fmt: skip
    assert "No pretrained configuration" not in caplog.text
    model = timm.create_model(**kwargs)
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 192, 192) and data["crop_pct"] == pytest.approx(192 / 224)
    test = resolve_data_config({}, model=model, use_test_size=True)
    assert test["input_size"] == (3, 256, 256)
