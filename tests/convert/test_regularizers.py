"""Dropout and stochastic depth survive conversion: the trace is the eval-mode forward, where
both are the identity, yet the converted model must drop out in ``train()`` as its source did."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bn_stats import warm_bn
from normfree.convert import convert_model, load_converted, save_converted
from normfree.convert.graph import is_stochastic_depth
from normfree.nn import StochasticDepth


class _Regularized(nn.Module):
    """Conv→BN stem, one residual block whose branch ends in stochastic depth, a head with a
    functional dropout of rate 0 (the identity: left as it is) and one of rate 0.25, both
    written ``training=self.training``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.drop_path = StochasticDepth(0.5)
        self.fc = nn.Linear(8, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.stem(x)))
        h = h + self.drop_path(self.bn(self.conv(h)))
        h = F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1)
        h = F.dropout(h, p=0.0, training=self.training)
        return F.dropout(self.fc(h), p=0.25, training=self.training)


def _converted() -> nn.Module:
    torch.manual_seed(0)
    model = _Regularized()
    warm_bn(model, (8, 3, 12, 12), 2)
    return convert_model(model.eval(), "bn_free", torch.randn(8, 3, 12, 12))


def _only_train(model: nn.Module, kind: type[nn.Module] | str) -> None:
    """``model.train()`` with every regularizer but those of ``kind`` back in eval mode."""
    model.train()
    for m in model.modules():
        dropout = isinstance(m, nn.Dropout)
        if (dropout or is_stochastic_depth(m)) and (kind != "dropout") == dropout:
            m.eval()


def test_the_converted_model_drops_out_in_train_mode_only():
    """The functional dropout (p = 0.25) becomes an ``nn.Dropout`` read from the module's mode:
    in train mode each output is 0 or ``y_eval / 0.75`` (exact), about a quarter of them 0
    (1,024 draws, fixed seed: 0.25 ± 0.04, 3σ); in eval mode the output is the BN model's."""
    c = _converted()
    assert c.report.regularizers == 2 and c.report.rel_error < 1e-5
    dropouts = [m for m in c.modules() if isinstance(m, nn.Dropout)]
    assert [m.p for m in dropouts] == [0.25]
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        y_eval = c.eval()(x)
        _only_train(c, "dropout")
        torch.manual_seed(1)
        y = c(x)
    zero = y == 0
    assert abs(zero.float().mean().item() - 0.25) < 0.04
    torch.testing.assert_close(y[~zero], y_eval[~zero] / 0.75, rtol=1e-6, atol=0)
    assert "2 dropout / stochastic-depth calls kept for train()" in c.report.summary()


def test_stochastic_depth_is_kept_as_a_call_that_follows_train():
    """The block's ``StochasticDepth(0.5)`` is a leaf call: in train mode each example's output
    is either the eval output (branch kept, no rescaling: the official rule) or the output with
    the branch dropped, computed by zeroing that call's output in eval mode; over 64 examples
    both occur, 32 ± 12 (3σ) kept."""
    c = _converted()
    (depth,) = [m for m in c.modules() if isinstance(m, StochasticDepth)]
    x = torch.randn(64, 3, 12, 12)
    with torch.no_grad():
        y_kept = c.eval()(x)
        handle = depth.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
        y_dropped = c(x)
        handle.remove()
        _only_train(c, "depth")
        torch.manual_seed(2)
        y = c(x)
    kept = torch.isclose(y, y_kept, rtol=1e-6, atol=1e-7).all(1)
    dropped = torch.isclose(y, y_dropped, rtol=1e-6, atol=1e-7).all(1)
    assert bool((kept ^ dropped).all())
    assert abs(int(kept.sum()) - 32) <= 12


def test_normfree_sources_record_their_rates_and_rebuild_with_them(tmp_path):
    """A normfree BN model built with dropout and stochastic depth: its description records
    both rates, so the file rebuilds the same regularizers (it used to be refused, or to lose
    them); ``stochdepth_rate`` 0.2 over 9 blocks gives 8 non-zero rates, plus the head's
    dropout."""
    from normfree.models import create_model

    torch.manual_seed(0)
    model = create_model("bn_resnet_cifar20", num_classes=10, stochdepth_rate=0.2, drop_rate=0.3)
    warm_bn(model, (4, 3, 16, 16), 1)
    c = convert_model(model.eval(), "nf", torch.randn(4, 3, 16, 16), standalone_bn="affine")
    assert c.report.regularizers == 9
    kwargs = c.description["source_kwargs"]
    assert (kwargs["drop_rate"], kwargs["stochdepth_rate"]) == (0.3, 0.2)
    save_converted(c, tmp_path / "c.safetensors")
    back = load_converted(tmp_path / "c.safetensors")
    rates = [m.drop_rate for m in back.modules() if isinstance(m, StochasticDepth)]
    assert rates == [m.drop_rate for m in c.modules() if isinstance(m, StochasticDepth)]
    assert sum(r > 0 for r in rates) == 8
    assert [m.p for m in back.modules() if isinstance(m, nn.Dropout)] == [0.3]


def test_timm_drop_path_and_head_dropout_are_kept():
    """timm's ResNet: seven ``DropPath`` with a rate above 0 (the first block's is 0, an
    Identity) and ``forward_head``'s ``F.dropout(p=drop_rate, training=self.training)``."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=5, drop_rate=0.25, drop_path_rate=0.1)
    c = convert_model(model.eval(), "bn_free", torch.randn(2, 3, 32, 32))
    assert c.report.regularizers == 8 and c.report.rel_error < 1e-5
    assert sum(type(m).__name__ == "DropPath" for m in c.modules()) == 7
    assert [m.p for m in c.modules() if isinstance(m, nn.Dropout)] == [0.25]
