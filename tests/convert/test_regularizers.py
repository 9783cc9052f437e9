"""Dropout and stochastic depth survive conversion: the trace is the eval-mode forward, where
both are the identity, yet the converted model must drop out in ``train()`` as its source did."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bn_stats import warm_bn
from normfree.convert import FeatureDropout, convert_model, load_converted, save_converted
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


class _DropBetween(nn.Module):
    """Conv→BN stem, a functional dropout of rate ``p`` between it and the residual branch's
    conv, and a branch ending in ``F.dropout2d`` of rate ``p``; ``training`` is what each
    dropout is given (None: ``self.training``)."""

    def __init__(self, p: float, training: bool | None = None) -> None:
        super().__init__()
        self.p, self.training_arg = p, training
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.training if self.training_arg is None else self.training_arg
        h = F.dropout(F.relu(self.bn0(self.stem(x))), self.p, training)
        h = h + F.dropout2d(self.bn(self.conv(h)), self.p, training)
        return self.fc(F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1))


def _warm_drop_between(p: float, training: bool | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = _DropBetween(p, training)
    model.p = 0.0  # the same running statistics for every p
    warm_bn(model, (8, 3, 12, 12), 2)
    model.p = p
    return model.eval()


def test_nf_calibration_runs_the_new_dropouts_in_eval_mode():
    """The dropouts made from functional calls take the traced model's (eval) mode, so the NF
    calibration pass sees no dropout: converting with p = 0.5 twice gives the same tensors, and
    the eval outputs equal those of the same model with p = 0 (to 1e-5; they used to differ by
    the dropped calibration inputs, rel. error 0.08 instead of 0.04). The branch's
    ``Dropout2d`` is scale-free, so the branch gets its α (one ``· 0.2`` in the graph)."""
    x = torch.randn(16, 3, 12, 12)
    a, b = (convert_model(_warm_drop_between(0.5), "nf", x) for _ in range(2))
    none = convert_model(_warm_drop_between(0.0), "nf", x)
    assert a.report.regularizers == 2
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(t, u), name
    with torch.no_grad():
        torch.testing.assert_close(a(x), none(x), rtol=0, atol=1e-5)
    assert abs(a.report.rel_error - none.report.rel_error) < 1e-5
    assert a.net.code.count("* 0.2") == 1


def test_a_dropout_recorded_with_training_true_is_left_as_called():
    """``F.dropout(x, p, True)`` drops out in eval mode too (Monte-Carlo dropout): it is not
    made a module, so the converted model drops out in eval mode as its source does (two eval
    calls differ), and no regularizer is counted."""
    model = _warm_drop_between(0.5, training=True)
    c = convert_model(model, "bn_free", torch.randn(4, 3, 12, 12))
    assert c.report.regularizers == 0
    assert not [m for m in c.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert not torch.equal(c.eval()(x), c(x))


def test_a_rate_given_as_an_int_is_kept():
    """``F.dropout(x, 1, self.training)`` (p an int) becomes ``nn.Dropout(p=1.0)``: in train
    mode the output is the classifier's bias alone (every feature dropped), in eval mode the
    BN model's."""
    model = _warm_drop_between(1)
    c = convert_model(model, "bn_free", torch.randn(4, 3, 12, 12))
    assert c.report.regularizers == 2 and c.report.rel_error < 1e-5
    assert [m.p for m in c.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))] == [1.0, 1.0]
    with torch.no_grad():
        y = c.train()(torch.randn(2, 3, 12, 12))
    torch.testing.assert_close(y, c.net.fc.bias.expand(2, -1), rtol=0, atol=0)


class _Through(nn.Module):
    """The identity, as a module torch.fx traces through (not a leaf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_gnpn_finds_the_activation_past_timm_drop_block():
    """timm's ResNet with ``drop_block_rate``: BN → ``DropBlock2d`` → ReLU in its last 4
    blocks. The DropBlock is a leaf call now, yet GN+PN still makes each such BN and ReLU one
    Proxy-Norm ``NormAct`` (it made a plain GroupNorm, another function), 5 with the stem's,
    keeps the 4 DropBlocks and gives the eval outputs of the same model whose DropBlocks the
    trace passes through (to 1e-6)."""
    timm = pytest.importorskip("timm")
    from normfree.nn.proxy_norm import NormAct

    torch.manual_seed(0)
    drop = timm.create_model("resnet18", num_classes=5, drop_block_rate=0.1)
    warm_bn(drop, (2, 3, 32, 32), 1)
    through = copy.deepcopy(drop)
    for block in through.modules():
        if type(getattr(block, "drop_block", None)).__name__ == "DropBlock2d":
            block.drop_block = _Through()
    x = torch.randn(2, 3, 32, 32)
    c, ref = convert_model(drop, "gnpn", x), convert_model(through, "gnpn", x)
    assert sum(type(m).__name__ == "DropBlock2d" for m in c.modules()) == 4
    assert sum(isinstance(m, NormAct) for m in c.modules()) == 5
    assert sum(isinstance(m, NormAct) for m in ref.modules()) == 5
    with torch.no_grad():
        torch.testing.assert_close(c(x), ref(x), rtol=0, atol=1e-6)


class _TorchDropouts(nn.Module):
    """torch's own dropouts, as older code calls them: ``torch.dropout``, ``torch.feature_dropout``
    (its ``train`` passed by keyword) and the in-place ``torch.alpha_dropout_``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.dropout(F.relu(self.bn(self.stem(x))), self.p, self.training)
        h = torch.feature_dropout(h, self.p, train=self.training)
        h = torch.alpha_dropout_(F.adaptive_avg_pool2d(h, 1).flatten(1), self.p, self.training)
        return self.fc(h)


@pytest.mark.parametrize("p", [0.25, 1.0])
def test_torch_s_own_dropouts_become_modules(p: float):
    """``torch.dropout`` / ``feature_dropout`` / ``alpha_dropout_`` traced in eval mode become
    ``nn.Dropout``, :class:`FeatureDropout` and an in-place ``nn.AlphaDropout`` (they used to be
    left with ``train=False``, so the converted model never dropped out). In eval mode the
    converted model computes the BN model's outputs; in train mode with p = 1 every feature is
    dropped and each row is the classifier's bias."""
    torch.manual_seed(0)
    model = _TorchDropouts(p)
    warm_bn(model, (8, 3, 12, 12), 2)
    x = torch.randn(4, 3, 12, 12)
    c = convert_model(model.eval(), "bn_free", x)
    assert c.report.regularizers == 3
    kinds = [(type(m), m.p, m.inplace) for m in c.modules()
             if isinstance(m, (nn.Dropout, FeatureDropout, nn.AlphaDropout))]  # fmt: skip
    assert kinds == [(nn.Dropout, p, False), (FeatureDropout, p, False), (nn.AlphaDropout, p, True)]
    assert "dropout(" not in c.net.code.replace("functional_dropout", "")
    with torch.no_grad():
        torch.testing.assert_close(c.eval()(x), model(x), rtol=0, atol=1e-5)
        if p == 1.0:
            assert torch.equal(c.train()(x), c.net.get_submodule("fc").bias.expand(4, 4))


def test_feature_dropout_matches_torch_s_on_every_rank():
    """:class:`FeatureDropout` drops whole channels of inputs of rank 2 to 5 exactly as
    ``torch.feature_dropout`` (same seed, same mask), and is the identity in eval mode."""
    layer = FeatureDropout(0.5)
    for shape in [(6, 5), (6, 5, 7), (6, 5, 3, 4), (6, 5, 2, 3, 4)]:
        x = torch.randn(shape)
        torch.manual_seed(1)
        want = torch.feature_dropout(x, 0.5, True)
        torch.manual_seed(1)
        assert torch.equal(layer.train()(x), want)
        kept = want.flatten(2).abs().sum(-1) > 0 if x.ndim > 2 else want != 0
        assert 0 < kept.float().mean() < 1
        assert torch.equal(layer.eval()(x), x)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        FeatureDropout(1.5)
