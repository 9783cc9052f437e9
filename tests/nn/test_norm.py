"""The norm-spec factory (normfree.nn.norm): which conv, norm and activation each spec builds."""

from __future__ import annotations

import pytest
from torch import nn

from normfree.nn import NORM_SPECS, HeConv2d, ProxyNormActivation, WSConv2d, norm_layers


@pytest.mark.parametrize(
    ("spec", "conv", "norm", "groups", "affine", "act"),
    [
        ("bn", HeConv2d, nn.BatchNorm2d, None, True, nn.ReLU),
        ("gn", HeConv2d, nn.GroupNorm, 32, True, nn.ReLU),
        ("ln", HeConv2d, nn.GroupNorm, 1, True, nn.ReLU),
        ("gnpn", HeConv2d, nn.GroupNorm, 32, False, ProxyNormActivation),
        ("lnpn", HeConv2d, nn.GroupNorm, 1, False, ProxyNormActivation),
        ("wsgn", WSConv2d, nn.GroupNorm, 32, True, nn.ReLU),
    ],
)
def test_each_spec_builds_its_layers(
    spec: str, conv: type, norm: type, groups: int | None, affine: bool, act: type
) -> None:
    layers = norm_layers(spec, eps=1e-3)  # type: ignore[arg-type]
    c = layers.conv(16, 64, 3, stride=2)
    assert type(c) is conv and c.bias is None and c.stride == (2, 2)
    n = layers.norm(64)
    assert type(n) is norm and n.eps == 1e-3 and n.affine is affine
    if groups is not None:
        assert n.num_groups == groups
    assert type(layers.act(64)) is act
    assert layers.uses_batch_stats is (spec == "bn")
    if act is ProxyNormActivation:  # the top activation only subtracts the proxy mean
        assert layers.act(64).scale and not layers.act(64, top=True).scale


def test_spec_list_and_errors() -> None:
    assert NORM_SPECS == ("bn", "gn", "ln", "gnpn", "lnpn", "wsgn")
    with pytest.raises(ValueError, match="norm must be one of"):
        norm_layers("wsln")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm_eps"):
        norm_layers("gn", eps=0.0)
    # the group rule leaves at least two channels per group
    assert norm_layers("gn").norm(16).num_groups == 8
