"""``create_model``'s architecture options are checked against the model's constructor: a
boolean option takes only ``True``/``False`` (``use_ws="no"`` is a truthy string and built
Scaled-WS convs), and an unknown one names the closest options instead of Python's bare
"unexpected keyword argument"."""

from __future__ import annotations

import pytest

import normfree
from normfree.models.registry import _options, model_entrypoint
from normfree.nn import ScaledStdConv2d


@pytest.mark.parametrize("value", ["no", "maybe", "true", 0, 1])
def test_a_boolean_option_takes_only_a_boolean(value: object) -> None:
    with pytest.raises(TypeError, match=r"option use_ws=.* must be true or false"):
        normfree.create_model("nf_resnet_cifar20", use_ws=value)
    plain = normfree.create_model("nf_resnet_cifar20", use_ws=False)
    assert not any(isinstance(m, ScaledStdConv2d) for m in plain.modules())


def test_an_unknown_option_names_the_closest_ones() -> None:
    with pytest.raises(TypeError, match="has no option 'use_wss'; did you mean use_ws, use_se"):
        normfree.create_model("nf_resnet_cifar20", use_wss=False)
    with pytest.raises(TypeError, match="has no option 'zzz'; its options: depths, "):
        normfree.create_model("nf_resnet_cifar20", zzz=1)
    assert normfree.create_model("nf_resnet_cifar20", width=2).num_classes == 10  # a factory's


def test_every_factory_s_options_are_known() -> None:
    """Every registered factory names the class it returns, so its options can be checked."""
    for name in normfree.list_models():
        options = _options(model_entrypoint(name))
        assert "num_classes" in options and "meta" not in options, name
