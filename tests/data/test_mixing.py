"""MixUp / CutMix label mixing, label smoothing after mixing, and the soft-target loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normfree.data import BatchMixer, soft_target_cross_entropy

K = 7  # > batch size, so every example of a batch has its own class


def _batch(b: int = 6, h: int = 12, w: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    # sample i is the constant image i+1, so pasted pixels are identifiable
    x = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 2, h, w).clone()
    y = torch.arange(b) % K
    return x, y


def test_mixup_targets_are_lam_weighted_exactly() -> None:
    x, y = _batch()
    mixer = BatchMixer(K, mixup_alpha=0.2)
    for seed in range(5):
        xm, t = mixer(x, y, generator=torch.Generator().manual_seed(seed))
        lam = mixer.last_lam
        assert mixer.last_mode == "mixup" and 0.0 <= lam <= 1.0
        one = F.one_hot(y, K).float()
        assert torch.equal(t, lam * one + (1.0 - lam) * one.flip(0))
        assert torch.equal(xm, lam * x + (1.0 - lam) * x.flip(0))
        torch.testing.assert_close(t.sum(1), torch.ones(6), rtol=0, atol=1e-6)


def test_cutmix_label_ratio_is_the_pasted_area() -> None:
    x, y = _batch()
    mixer = BatchMixer(K, cutmix_alpha=1.0)
    areas = []
    for seed in range(20):
        xm, t = mixer(x, y, generator=torch.Generator().manual_seed(seed))
        assert mixer.last_mode == "cutmix"
        for i in range(6):
            j = 5 - i
            n_pasted = int((xm[i] == j + 1).sum())  # partner pixels (2 channels x 12 x 20)
            assert n_pasted + int((xm[i] == i + 1).sum()) == 480
            assert t[i, y[j]] == pytest.approx(n_pasted / 480, abs=1e-7)
            assert t[i, y[i]] == pytest.approx(1.0 - n_pasted / 480, abs=1e-7)
        top, bottom, left, right = mixer.last_box
        assert mixer.last_lam == pytest.approx(1 - (bottom - top) * (right - left) / 240)
        areas.append(1 - mixer.last_lam)
        torch.testing.assert_close(t.sum(1), torch.ones(6), rtol=0, atol=1e-6)
    assert len(set(areas)) > 10  # the area varies from batch to batch


def test_switch_prob_and_determinism() -> None:
    x, y = _batch()
    always_cut = BatchMixer(K, mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=1.0)
    always_mix = BatchMixer(K, mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.0)
    both = BatchMixer(K, mixup_alpha=0.2, cutmix_alpha=1.0)
    modes = []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        always_cut(x, y, g)
        always_mix(x, y, g)
        both(x, y, g)
        assert (always_cut.last_mode, always_mix.last_mode) == ("cutmix", "mixup")
        modes.append(both.last_mode)
    assert 8 <= modes.count("cutmix") <= 32
    r1 = both(x, y, torch.Generator().manual_seed(99))
    r2 = both(x, y, torch.Generator().manual_seed(99))
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    torch.manual_seed(1)  # without a generator the global RNG drives it
    r3 = both(x, y)
    torch.manual_seed(1)
    r4 = both(x, y)
    assert torch.equal(r3[1], r4[1])


@pytest.mark.parametrize("kw", [{"mixup_alpha": 0.2}, {"cutmix_alpha": 1.0}, {}])
def test_label_smoothing_is_applied_after_mixing(kw: dict) -> None:
    x, y = _batch()
    eps = 0.1
    plain = BatchMixer(K, **kw)
    smooth = BatchMixer(K, label_smoothing=eps, **kw)
    xp, tp = plain(x, y, torch.Generator().manual_seed(3))
    xs, ts = smooth(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(xp, xs)
    assert torch.equal(ts, tp * (1 - eps) + eps / K)
    torch.testing.assert_close(ts.sum(1), torch.ones(6), rtol=0, atol=1e-6)
    assert smooth.enabled and plain.enabled == bool(kw)


def test_soft_target_cross_entropy_matches_torch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, K, dtype=torch.float64)
    y = torch.randint(0, K, (7,))
    one = F.one_hot(y, K).double()
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, one), F.cross_entropy(logits.float(), y)
    )
    for eps in (0.1, 0.3):
        target = one * (1 - eps) + eps / K
        torch.testing.assert_close(
            soft_target_cross_entropy(logits, target),
            F.cross_entropy(logits.float(), y, label_smoothing=eps),
        )
    # gradients agree too
    z1 = logits.float().clone().requires_grad_()
    z2 = logits.float().clone().requires_grad_()
    soft_target_cross_entropy(z1, one * 0.9 + 0.1 / K).backward()
    F.cross_entropy(z2, y, label_smoothing=0.1).backward()
    torch.testing.assert_close(z1.grad, z2.grad)


def test_errors() -> None:
    with pytest.raises(ValueError, match="mixup_alpha"):
        BatchMixer(K, mixup_alpha=-1)
    with pytest.raises(ValueError, match="label_smoothing"):
        BatchMixer(K, label_smoothing=1.0)
    with pytest.raises(ValueError, match="labels must lie"):
        BatchMixer(K, mixup_alpha=1)(torch.zeros(2, 1, 4, 4), torch.tensor([0, K]))
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        soft_target_cross_entropy(torch.zeros(2, K), torch.zeros(2, K + 1))
    assert not BatchMixer(K).enabled


def test_a_cutmix_box_has_the_drawn_side_odd_or_even() -> None:
    """Away from the borders the pasted box is exactly int(H·√(1−λ)) × int(W·√(1−λ)), odd
    sides included (as timm's ``rand_bbox``; ``cy ± ch // 2`` was one pixel short)."""
    mixer = BatchMixer(K, cutmix_alpha=1.0)
    sides = set()
    for seed in range(400):
        g = torch.Generator().manual_seed(seed)
        lam = float(torch.rand(()))
        top, bottom, left, right = mixer._cutmix_box(lam, 64, 64, g)
        ch = int(64 * (1 - lam) ** 0.5)
        if 0 < top and bottom < 64 and 0 < left and right < 64:
            assert (bottom - top, right - left) == (ch, ch)
            sides.add(ch % 2)
    assert sides == {0, 1}
