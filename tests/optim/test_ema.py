"""EMA of weights with the NFNet warmup decay_t = min(decay, (1+t)/(10+t))
(Brock et al. 2021b, App. C; DeepMind ``tf1_ema``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normfree.optim.ema import ModelEMA, ema_decay


def test_warmup_formula_values() -> None:
    assert ema_decay(0.99999, 0) == pytest.approx(0.1, abs=1e-15)  # 1/10
    assert ema_decay(0.99999, 90) == pytest.approx(0.91, abs=1e-15)  # 91/100
    assert ema_decay(0.9, 1000) == 0.9  # capped by the target decay
    assert ema_decay(0.99, 5, warmup=False) == 0.99
    with pytest.raises(ValueError, match="decay"):
        ema_decay(1.5, 0)
    for decay in ("0.9", True, float("nan")):  # a string used to raise TypeError from "<="
        with pytest.raises(ValueError, match="EMA decay must be a number in"):
            ema_decay(decay, 0)  # type: ignore[arg-type]
    for step in (1.5, -1, True):
        with pytest.raises(ValueError, match="EMA step must be an int >= 0"):
            ema_decay(0.9, step)  # type: ignore[arg-type]


def test_exact_values_for_a_scalar_parameter() -> None:
    lin = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = ModelEMA(lin, decay=0.5)
    expected = 1.0
    for t, theta in enumerate([3.0, -2.0, 5.0, 0.25]):
        with torch.no_grad():
            lin.weight.fill_(theta)
        d = ema.update(lin)
        ref_d = min(0.5, (1 + t) / (10 + t))  # 0.1, 2/11, 3/12, 4/13
        assert d == pytest.approx(ref_d, abs=1e-15)
        expected = ref_d * expected + (1 - ref_d) * theta
        assert ema.module.weight.item() == pytest.approx(expected, abs=1e-14)
    # after four updates: hand-computed
    assert ema.num_updates == 4
    assert not ema.module.weight.requires_grad
    assert not ema.module.training


def test_buffers_averaged_or_copied_and_state_roundtrip() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    ema = ModelEMA(model, decay=0.9)
    model.train()
    model(torch.randn(4, 1, 3, 3))  # changes running stats and num_batches_tracked
    ema.update(model)
    bn, ebn = model[1], ema.module[1]
    assert torch.allclose(ebn.running_mean, 0.9 * bn.running_mean)  # 0.1·0 + 0.9·new
    assert int(ebn.num_batches_tracked) == 1  # integer buffers are copied
    other = ModelEMA(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and other.decay == 0.9
    for a, b in zip(other.module.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(KeyError, match="num_updates"):
        other.load_state_dict({"module": {}})


def test_an_update_from_another_model_is_refused_by_name() -> None:
    """Another architecture (a superset of the names) or another head (a shape) is refused
    before anything is averaged."""
    from normfree.models import create_model

    torch.manual_seed(0)
    ema = ModelEMA(create_model("nf_resnet_cifar20", num_classes=10))
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with pytest.raises(ValueError, match=r"not the one this average was made from \(missing "
                       r"none, unexpected stages\.0\.3\."):  # fmt: skip
        ema.update(create_model("nf_resnet_cifar56", num_classes=10))
    with pytest.raises(ValueError, match=r"'head\.fc\.weight' is \(7, 64\) in the model but "
                       r"\(10, 64\) in the average"):  # fmt: skip
        ema.update(create_model("nf_resnet_cifar20", num_classes=7))
    assert ema.num_updates == 0
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, before[k]), k
