"""Batch-level MixUp / CutMix and label smoothing with soft targets, as in the NFNet recipe.

MixUp (Zhang et al. 2018): ``x̃ = λ·x_i + (1 − λ)·x_j``, ``ỹ = λ·y_i + (1 − λ)·y_j`` with
``λ ~ Beta(α, α)`` (NFNet: α = 0.2). CutMix (Yun et al. 2019): a box of area ``≈ 1 − λ`` from
``x_j`` is pasted into ``x_i`` and the label weight of ``y_j`` is the *exact* pasted area fraction
(NFNet: α = 1, i.e. a uniform area). Partners are the batch in reverse order (``j = B−1−i``).
Label smoothing is applied after mixing, as in the official code:
``ỹ ← ỹ·(1 − ε) + ε / K`` (Szegedy et al. 2016; Brock et al. 2021b use ε = 0.1).

The official pipeline splits each batch into a MixUp half and a CutMix half; here the whole batch
uses one of them, CutMix with probability ``switch_prob`` when both are enabled (the expected
share of each is the same).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BatchMixer", "soft_target_cross_entropy"]


def _check_nonneg(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


class BatchMixer:
    """MixUp / CutMix on a batch, returning soft targets ``(B, K)``.

    Args:
        num_classes: ``K``.
        mixup_alpha: MixUp ``Beta(α, α)`` parameter (0 disables MixUp).
        cutmix_alpha: CutMix ``Beta(α, α)`` parameter (0 disables CutMix).
        switch_prob: probability of CutMix for a batch when both are enabled.
        label_smoothing: ε, applied after mixing.

    After each call ``last_mode`` (``"mixup"``, ``"cutmix"`` or ``None``), ``last_lam`` (the
    weight of the batch's own labels) and ``last_box`` (``(top, bottom, left, right)`` of the
    pasted CutMix region) describe what was done.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.mixup_alpha = _check_nonneg("mixup_alpha", mixup_alpha)
        self.cutmix_alpha = _check_nonneg("cutmix_alpha", cutmix_alpha)
        self.switch_prob = _check_nonneg("switch_prob", switch_prob)
        if self.switch_prob > 1:
            raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob}")
        self.label_smoothing = _check_nonneg("label_smoothing", label_smoothing)
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.last_mode: str | None = None
        self.last_lam: float = 1.0
        self.last_box: tuple[int, int, int, int] | None = None

    @property
    def enabled(self) -> bool:
        """Whether any mixing or smoothing is active."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.label_smoothing > 0

    def __repr__(self) -> str:
        return (
            f"BatchMixer(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
            f"cutmix_alpha={self.cutmix_alpha}, switch_prob={self.switch_prob}, "
            f"label_smoothing={self.label_smoothing})"
        )

    @staticmethod
    def _uniform(generator: torch.Generator | None) -> float:
        return float(torch.rand((), generator=generator))

    @staticmethod
    def _beta(alpha: float, generator: torch.Generator | None) -> float:
        # Beta(α, α) from numpy seeded by a torch draw: reproducible from `generator` (or torch's
        # global RNG) without touching any global numpy state.
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        return float(np.random.default_rng(seed).beta(alpha, alpha))

    def _cutmix_box(
        self, lam: float, h: int, w: int, generator: torch.Generator | None
    ) -> tuple[int, int, int, int]:
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy = int(torch.randint(h, (), generator=generator))
        cx = int(torch.randint(w, (), generator=generator))
        # a box of ch × cw before clipping, odd sides included (as timm's rand_bbox; the
        # original code's cy ± ch // 2 is one pixel short for odd sides)
        top, bottom = max(cy - ch // 2, 0), min(cy + (ch + 1) // 2, h)
        left, right = max(cx - cw // 2, 0), min(cx + (cw + 1) // 2, w)
        return top, bottom, left, right

    def targets(self, y: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """One-hot ``(B, K)`` targets of integer labels (soft ``(B, K)`` targets pass through)."""
        if y.ndim == 2:
            if y.shape[1] != self.num_classes:
                raise ValueError(f"soft targets must be (B, {self.num_classes}), got {y.shape}")
            return y.to(dtype)
        if y.ndim != 1 or y.dtype.is_floating_point:
            raise ValueError(f"labels must be int (B,) or soft (B, K), got {y.dtype} {y.shape}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        return F.one_hot(y.long(), self.num_classes).to(dtype)

    def __call__(
        self, x: Tensor, y: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mix ``x`` ``(B, C, H, W)`` and labels ``y`` ``(B,)``; returns ``(x̃, ỹ)``."""
        if x.ndim != 4 or x.shape[0] != y.shape[0]:
            raise ValueError(f"expected x (B, C, H, W) and y (B,), got {x.shape} and {y.shape}")
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        target = self.targets(y, dtype).to(x.device)
        self.last_mode, self.last_lam, self.last_box = None, 1.0, None
        use_mix, use_cut = self.mixup_alpha > 0, self.cutmix_alpha > 0
        if use_mix and use_cut:
            use_cut = self._uniform(generator) < self.switch_prob
            use_mix = not use_cut
        if use_mix:
            lam = self._beta(self.mixup_alpha, generator)
            x = lam * x + (1.0 - lam) * x.flip(0)
            self.last_mode, self.last_lam = "mixup", lam
        elif use_cut:
            h, w = x.shape[-2:]
            top, bottom, left, right = self._cutmix_box(
                self._beta(self.cutmix_alpha, generator), h, w, generator
            )
            x = x.clone()
            x[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / float(h * w)
            self.last_mode, self.last_lam, self.last_box = "cutmix", lam, (top, bottom, left, right)
        if self.last_mode is not None:
            target = self.last_lam * target + (1.0 - self.last_lam) * target.flip(0)
        if self.label_smoothing > 0:
            eps = self.label_smoothing
            target = target * (1.0 - eps) + eps / self.num_classes
        return x, target


def soft_target_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of ``−Σ_k t_k · log softmax(z)_k`` (computed in float32).

    With one-hot targets this is ``F.cross_entropy``; with ``t·(1−ε) + ε/K`` it equals
    ``F.cross_entropy(..., label_smoothing=ε)``.
    """
    if logits.shape != target.shape or logits.ndim != 2:
        raise ValueError(
            f"logits and target must both be (B, K), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(target.float() * logp).sum(dim=-1).mean()
