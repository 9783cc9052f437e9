"""Tensor augmentation: pad-crop, flip, Inception crop, RandAugment levels, config errors."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from normfree.data import AugmentConfig, RandAugment, build_datasets, default_augment
from normfree.data.augment import (
    PadRandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    crop_flip_transforms,
)
from normfree.data.randaugment import RANDAUGMENT_OPS, level_to_arg


def _pad_crop(backend: str) -> object:
    if backend == "tensor":
        return PadRandomCrop(2)
    pytest.importorskip("torchvision")
    (crop,), _ = crop_flip_transforms(6, AugmentConfig(crop="pad", pad=2), use_torchvision=True)
    return crop


@pytest.mark.parametrize("backend", ["tensor", "torchvision"])
def test_pad_crop_is_a_uniform_window_of_the_padded_image(backend: str) -> None:
    img = torch.arange(1, 3 * 6 * 6 + 1, dtype=torch.float32).view(3, 6, 6)
    padded = torch.zeros(3, 10, 10)
    padded[:, 2:8, 2:8] = img
    windows = {(t, s): padded[:, t : t + 6, s : s + 6] for t in range(5) for s in range(5)}
    crop = _pad_crop(backend)
    torch.manual_seed(0)
    seen = set()
    for _ in range(300):
        out = crop(img)  # type: ignore[operator]
        match = [k for k, w in windows.items() if torch.equal(out, w)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 25  # all (2p+1)^2 offsets occur in 300 draws


@pytest.mark.parametrize("backend", ["tensor", "torchvision"])
def test_flip_probability(backend: str) -> None:
    img = torch.arange(4.0).view(1, 1, 4)
    flip: object = RandomHorizontalFlip()
    if backend == "torchvision":
        pytest.importorskip("torchvision")
        _, (flip,) = crop_flip_transforms(4, AugmentConfig(flip=True), use_torchvision=True)
    torch.manual_seed(1)
    flips = sum(bool(torch.equal(flip(img), img.flip(-1))) for _ in range(1000))  # type: ignore[operator]
    assert abs(flips / 1000 - 0.5) < 4 * math.sqrt(0.25 / 1000)  # 4 sigma


def test_inception_crop_window_ranges_and_fallback() -> None:
    rrc = RandomResizedCrop(16)
    torch.manual_seed(2)
    for _ in range(300):
        top, left, h, w = rrc.window(100, 100)
        assert 0 <= top <= 100 - h and 0 <= left <= 100 - w
        # rounding of h and w moves area/aspect by at most one pixel's worth
        assert 0.08 * 1e4 * 0.97 <= h * w <= 1e4
        assert 0.75 * 0.97 <= w / h <= 4 / 3 * 1.03
    # a 2x200 strip never fits the aspect range: central crop with the ratio clamped to 4/3
    assert rrc.window(2, 200) == (0, (200 - 3) // 2, 2, 3)
    out = rrc(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8


def test_official_level_semantics() -> None:
    # f = level / 10; formulas of the official autoaugment.py (module docstring)
    assert level_to_arg("Rotate", 5, 224, 224) == pytest.approx(15.0)
    assert level_to_arg("Rotate", 15, 224, 224) == pytest.approx(45.0)  # 1.5x the nominal max
    assert level_to_arg("ShearX", 10, 224, 224) == pytest.approx(0.3)
    assert level_to_arg("TranslateY", 15, 224, 224) == pytest.approx(150.0)
    assert level_to_arg("TranslateX", 10, 32, 32) == pytest.approx(100 / 224 * 32)
    assert [level_to_arg("Posterize", lv, 1, 1) for lv in (0, 5, 10, 15)] == [0, 2, 4, 6]
    assert [level_to_arg("Solarize", lv, 1, 1) for lv in (5, 10, 15)] == [128, 256, 384]
    assert [level_to_arg("SolarizeAdd", lv, 1, 1) for lv in (5, 10, 15)] == [55, 110, 165]
    for op in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert level_to_arg(op, 5, 1, 1) == pytest.approx(1.0)  # level 5 is the identity
        assert level_to_arg(op, 15, 1, 1) == pytest.approx(2.8)
    assert level_to_arg("Cutout", 10, 224, 224) == 40
    assert level_to_arg("Invert", 10, 8, 8) is None
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        level_to_arg("Blur", 3, 8, 8)


def test_randaugment_ops_against_closed_forms() -> None:
    ra = RandAugment(1, 10)
    torch.manual_seed(3)
    img = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8)
    i16 = img.to(torch.int16)
    assert torch.equal(ra.apply_op(img, "Posterize", 2), img & 0b11000000)
    assert torch.equal(ra.apply_op(img, "Posterize", 0), torch.zeros_like(img))
    solarized = torch.where(i16 < 100, i16, 255 - i16).byte()
    assert torch.equal(ra.apply_op(img, "Solarize", 100), solarized)
    assert torch.equal(ra.apply_op(img, "Solarize", 384), img)
    added = torch.where(i16 < 128, (i16 + 55).clamp(max=255), i16).byte()
    assert torch.equal(ra.apply_op(img, "SolarizeAdd", 55), added)
    assert torch.equal(ra.apply_op(img, "Invert", None), 255 - img)
    for op in ("Brightness", "Color", "Contrast", "Sharpness"):
        assert torch.equal(ra.apply_op(img, op, 1.0), img)
    assert torch.equal(ra.apply_op(img, "Brightness", 0.0), torch.zeros_like(img))
    assert torch.equal(ra.apply_op(img, "Rotate", 0.0), img)
    cut = ra.apply_op(img, "Cutout", 3)
    changed = (cut != img).any(0)
    assert int(changed.sum()) <= 36 and bool((cut[:, changed] == 128).all())


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_level_15_runs_every_op_reproducibly(channels: int) -> None:
    ra = RandAugment(4, 15)
    img = torch.randint(0, 256, (channels, 16, 16), dtype=torch.uint8)
    for op in RANDAUGMENT_OPS:  # every op accepts its level-15 argument, signed both ways
        arg = level_to_arg(op, 15, 16, 16)
        for a in (arg, -arg) if op in ("Rotate", "ShearX", "TranslateX") else (arg,):
            out = ra.apply_op(img, op, a)
            assert out.shape == img.shape and out.dtype == torch.uint8
    torch.manual_seed(4)
    a = [ra(img) for _ in range(20)]
    torch.manual_seed(4)
    b = [ra(img) for _ in range(20)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert sum(not torch.equal(p, img) for p in a) >= 15
    assert pickle.loads(pickle.dumps(ra)).magnitude == 15.0


def test_randaugment_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="num_ops"):
        RandAugment(-1, 5)
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(2, -1)
    with pytest.raises(ValueError, match="uint8"):
        RandAugment(2, 5)(torch.rand(3, 8, 8))


def test_augment_config_validation() -> None:
    with pytest.raises(ValueError, match="crop"):
        AugmentConfig(crop="center")
    with pytest.raises(ValueError, match="pad"):
        AugmentConfig(pad=-1)
    with pytest.raises(ValueError, match="randaugment"):
        AugmentConfig(randaugment=(1, 2, 3))  # type: ignore[arg-type]
    assert AugmentConfig(randaugment=[4, 5]).randaugment == (4, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"randaugment must be \(num_ops, magnitude\), got 5"):
        AugmentConfig(randaugment=5)  # type: ignore[arg-type]
    for name in ("scale", "ratio"):  # a scalar used to be a bare "cannot unpack" TypeError
        with pytest.raises(ValueError, match=f"{name} must be a pair"):
            AugmentConfig(**{name: 0.5})  # type: ignore[arg-type]
    assert AugmentConfig().is_identity and not AugmentConfig(flip=True).is_identity
    assert default_augment("cifar10:/x") == AugmentConfig(crop="pad", pad=4, flip=True)
    assert default_augment("imagefolder:/x").crop == "random_resized"


def test_augmentation_is_train_only_and_seeded() -> None:
    aug = AugmentConfig(crop="random_resized", flip=True, randaugment=(2, 9))
    b = build_datasets("synthetic:n=16,size=12", augment=aug, image_size=10)
    torch.manual_seed(5)
    first = [b.train[i][0] for i in range(16)]
    v1 = [b.val[i][0] for i in range(len(b.val))]
    torch.manual_seed(5)
    assert all(torch.equal(b.train[i][0], first[i]) for i in range(16))
    assert all(torch.equal(b.val[i][0], v1[i]) for i in range(len(b.val)))  # deterministic
    assert first[0].shape == (3, 10, 10) and v1[0].shape == (3, 10, 10)


def test_build_datasets_argument_errors() -> None:
    with pytest.raises(ValueError, match="unknown dataset spec 'mnist'"):
        build_datasets("mnist")
    with pytest.raises(ValueError, match="image_size"):
        build_datasets("digits", image_size=0)
    with pytest.raises(TypeError, match="augment"):
        build_datasets("digits", augment={"flip": True})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1- or 3-channel"):
        build_datasets("synthetic:channels=4", augment=AugmentConfig(randaugment=(1, 5)))


def test_crops_and_flips_come_from_torchvision_when_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v2 = pytest.importorskip("torchvision.transforms.v2")
    aug = AugmentConfig(crop="random_resized", flip=True)
    (crop,), (flip,) = crop_flip_transforms(16, aug)
    assert isinstance(crop, v2.RandomResizedCrop) and isinstance(flip, v2.RandomHorizontalFlip)
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((0.75, 4 / 3))
    torch.manual_seed(3)
    out = crop(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    # without torchvision (simulated) the tensor-only classes take over
    import normfree.data.augment as augment

    monkeypatch.setattr(augment, "optional_tv_transforms", lambda: None)
    (crop,), (flip,) = crop_flip_transforms(16, aug)
    assert isinstance(crop, RandomResizedCrop) and isinstance(flip, RandomHorizontalFlip)
    with pytest.raises(ImportError, match="vision"):
        crop_flip_transforms(16, aug, use_torchvision=True)
    assert crop_flip_transforms(16, AugmentConfig(crop="pad", pad=0)) == ([], [])
