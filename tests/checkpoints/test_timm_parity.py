"""Independent check of the NFNet architecture and the timm key mapping against timm's own
``dm_nfnet_f0`` (skipped when timm is not installed).

timm's dm_nfnet differs from the official code in two places (timm/layers/std_conv.py adds
``eps`` to the filter variance; timm's GELU is the exact-erf form, DeepMind's ``jax.nn.gelu`` the
tanh one). The test switches timm to
the official behaviour (tanh GELU, eps ~0) so that the remaining comparison is exact up to float
rounding; a separate assertion bounds the effect of timm's defaults.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import normfree
from normfree.checkpoints import normfree_to_timm, timm_to_normfree

timm = pytest.importorskip("timm")


def _official_behaviour(model: torch.nn.Module) -> None:
    from timm.models.nfnet import GammaAct

    def tanh_gelu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")

    for m in model.modules():
        if isinstance(m, GammaAct):
            m.act_fn = tanh_gelu
        if hasattr(m, "eps") and type(m).__name__.startswith("ScaledStdConv2d"):
            m.eps = 1e-12  # batch_norm needs eps > 0; negligible next to Var ~ 1/fan_in


@functools.lru_cache(maxsize=1)
def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = normfree.create_model("nfnet_f0", num_classes=7, drop_rate=0.0).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("skip_gain.gain"):
                p.fill_(0.7)  # exercise the residual branches
            elif name.endswith(".gain"):
                p.uniform_(0.8, 1.2)
    theirs = timm.create_model("dm_nfnet_f0", pretrained=False, num_classes=7).eval()
    return ours, theirs


def test_our_weights_in_timm_give_same_logits() -> None:
    ours, theirs = _pair()
    theirs.load_state_dict(normfree_to_timm(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ours(x)
        default_timm = theirs(x)
        _official_behaviour(theirs)
        official_timm = theirs(x)
    torch.testing.assert_close(official_timm, ref, rtol=1e-4, atol=1e-4)
    # timm's defaults (erf GELU, eps added to the variance) change the logits only slightly
    rel = (default_timm - ref).norm() / ref.norm()
    assert 0 < rel.item() < 0.2


def test_timm_state_dict_loads_into_ours_exactly() -> None:
    _, theirs = _pair()
    converted = timm_to_normfree(theirs.state_dict())
    fresh = normfree.create_model("nfnet_f0", num_classes=7, drop_rate=0.0).eval()
    fresh.load_state_dict(converted, strict=True)
    back = normfree_to_timm(fresh.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back[k], v), k
