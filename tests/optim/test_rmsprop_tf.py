"""TensorFlow 1's RMSprop (``normfree.optim.RMSpropTF``) against a slow element-by-element
reference written from TensorFlow's ``ApplyRMSProp`` / ``ApplyCenteredRMSProp`` kernels, in
float64."""

from __future__ import annotations

import math

import pytest
import torch

from normfree.optim import RMSpropTF


def _reference(w0, grads, lrs, alpha, eps, momentum, decay, centered):
    """Plain Python floats, one element at a time: ms starts at 1, mg and mom at 0;
    ms ← ms + (g² − ms)(1 − ρ); mg ← mg + (g − mg)(1 − ρ); mom ← μ·mom + η·g/√(ms − mg² + ε);
    w ← w − mom, with g the gradient plus decay·w (TensorFlow's L2 term)."""
    out = []
    for i, w in enumerate(w0):
        ms, mg, mom = 1.0, 0.0, 0.0
        for g_all, lr in zip(grads, lrs):
            g = g_all[i] + decay * w
            ms += (g * g - ms) * (1.0 - alpha)
            if centered:
                mg += (g - mg) * (1.0 - alpha)
            mom = momentum * mom + lr * g / math.sqrt(ms - mg * mg + eps)
            w -= mom
        out.append(w)
    return out


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize(("momentum", "decay"), [(0.0, 0.0), (0.9, 1e-2)])
def test_matches_tensorflow_kernels_element_by_element(centered, momentum, decay):
    """Seven steps with a learning rate that changes every step (the momentum buffer holds
    η·g, so a schedule acts on new gradients only): equal to 1e-13 in float64."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, generator=gen, dtype=torch.float64)
    grads = [torch.randn(12, generator=gen, dtype=torch.float64) * 10 ** (k % 3 - 1)
             for k in range(7)]  # fmt: skip
    lrs = [0.1 * 0.7**k for k in range(7)]
    w = torch.nn.Parameter(w0.clone())
    opt = RMSpropTF([w], lr=lrs[0], alpha=0.9, eps=1e-3, momentum=momentum, weight_decay=decay,
                    centered=centered)  # fmt: skip
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        w.grad = g.clone()
        opt.step()
    expected = _reference(w0.tolist(), [g.tolist() for g in grads], lrs, 0.9, 1e-3, momentum,
                          decay, centered)  # fmt: skip
    torch.testing.assert_close(w.detach(), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-13)  # fmt: skip


def test_first_step_in_closed_form_and_unlike_torch_rmsprop():
    """Step 1 is ``η·g/√(ρ + (1 − ρ)g² + ε)``: ms starts at 1, ε inside the root. For a tiny
    gradient (1e-6) that is ≈ η·g/√0.901, while ``torch.optim.RMSprop`` (ms from 0, ε outside)
    divides by √(0.1)·1e-6 + ε: a step ≈ 950 times larger with the recipes' ε = 1e-3."""
    g = torch.tensor([1e-6, 0.5, -3.0], dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    w.grad = g.clone()
    RMSpropTF([w], lr=0.1, alpha=0.9, eps=1e-3).step()
    expected = -0.1 * g / torch.sqrt(0.9 + 0.1 * g * g + 1e-3)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-15, atol=0)
    v = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    v.grad = g.clone()
    torch.optim.RMSprop([v], lr=0.1, alpha=0.9, eps=1e-3).step()
    ratio = float(v.detach()[0] / w.detach()[0])
    assert 900 < ratio < 1000


def test_state_dict_resumes_exactly():
    """Three steps, a state dict, a new optimizer loaded from it and two more steps: the same
    weights as five steps in one go (bitwise), momentum and centered buffers included."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(5)]

    def run(split: int | None) -> torch.Tensor:
        w = torch.nn.Parameter(torch.ones(4, 3))
        opt = RMSpropTF([w], lr=0.05, momentum=0.9, centered=True, eps=1e-3)
        for k, g in enumerate(grads):
            if k == split:
                state = opt.state_dict()
                opt = RMSpropTF([w], lr=0.05, momentum=0.9, centered=True, eps=1e-3)
                opt.load_state_dict(state)
            w.grad = g.clone()
            opt.step()
        return w.detach()

    assert torch.equal(run(None), run(3))


def test_invalid_settings_are_refused():
    w = [torch.nn.Parameter(torch.zeros(2))]
    bad = {"lr": -1.0, "alpha": 1.5, "eps": -1e-3, "momentum": -0.1, "weight_decay": -1.0}
    for key, value in bad.items():
        with pytest.raises(ValueError, match=rf"RMSpropTF: {key} must be"):
            RMSpropTF(w, **{key: value})
