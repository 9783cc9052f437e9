"""The shipped ``pretrained_cfg`` table (``normfree/integrations/timm_cfgs.json``) against models
built now: the table is what timm's registry answers before it builds a model, so a stale entry
would hand timm's scripts wrong sizes, crops or class counts. Regenerate it with
``python -m normfree.integrations.timm_cfgs``."""

from __future__ import annotations

import pytest

import normfree
from normfree.integrations.timm_cfgs import CFG_FILE, built_cfgs, shipped_cfgs

#: One cheap model of every family and layout (ImageNet and small-image), a few seconds in all;
#: the slow test below builds every model.
SAMPLE = [
    "bn_resnet26", "bn_resnet_cifar20", "efficientnet_b0_g16_bn", "efficientnet_b1_g1_lnpn",
    "efficientnet_b2_g16_gn", "fixup_resnet50", "fixup_resnet_cifar56", "gn_resnet50",
    "gn_resnet_cifar20", "gnpn_resnet_cifar20", "ln_resnet_cifar20", "lnpn_resnet50",
    "msr_resnet_cifar20", "nf_regnet_b0", "nf_resnet26", "nf_resnet_cifar20", "nfnet_f0",
    "rezero_resnet_cifar20", "skipinit_resnet_cifar56", "wsgn_resnet_cifar20",
]  # fmt: skip


def test_the_table_lists_every_registered_model_once() -> None:
    assert list(shipped_cfgs()) == normfree.list_models()
    assert CFG_FILE.read_text(encoding="utf-8").count("\n") == len(normfree.list_models()) + 2


@pytest.mark.parametrize("name", SAMPLE)
def test_a_shipped_cfg_equals_the_built_model_s(name: str) -> None:
    shipped = shipped_cfgs()[name]
    assert shipped == built_cfgs([name])[name]
    tuples = ("input_size", "test_input_size", "mean", "std", "pool_size", "test_pool_size")
    assert all(type(shipped[k]) is tuple for k in tuples)  # as timm's PretrainedCfg has them


def test_shipped_cfgs_are_fresh_copies() -> None:
    cfgs = shipped_cfgs()
    cfgs["nfnet_f0"]["input_size"] = (3, 1, 1)
    assert shipped_cfgs()["nfnet_f0"]["input_size"] == (3, 192, 192)


@pytest.mark.slow
def test_every_shipped_cfg_equals_the_built_model_s() -> None:
    shipped = shipped_cfgs()
    built = built_cfgs()
    assert {n: c for n, c in shipped.items() if c != built[n]} == {}
