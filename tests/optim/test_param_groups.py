"""Parameter groups from the model's declarations: weight-decay exclusion, AGC exclusion of the
classifier, BN baselines without AGC, Fixup scalars at lr/10 (Brock et al. 2021b, App. C)."""

from __future__ import annotations

import pytest
import torch

import normfree
from normfree.optim.param_groups import build_param_groups, describe_param_groups


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["group_name"]: g for g in groups}


def test_nf_resnet_groups_exact_membership() -> None:
    model = normfree.create_model("nf_resnet_cifar20", num_classes=10)
    groups = _by_name(build_param_groups(model, lr=0.4, weight_decay=2e-5, clipping=0.01))
    named = dict(model.named_parameters())
    scalars_vectors = {n for n, p in named.items() if p.ndim <= 1}
    assert set(groups) == {"decay", "no_decay", "decay_noclip", "no_decay_noclip"}
    assert set(groups["decay_noclip"]["param_names"]) == {"head.fc.weight"}
    assert set(groups["no_decay_noclip"]["param_names"]) == {"head.fc.bias"}
    assert set(groups["no_decay"]["param_names"]) == scalars_vectors - {"head.fc.bias"}
    assert set(groups["decay"]["param_names"]) == set(named) - scalars_vectors - {"head.fc.weight"}
    # every skip gain and WS gain/bias is in the no-decay group, every conv kernel decays
    assert any(n.endswith("skip_gain.gain") for n in groups["no_decay"]["param_names"])
    assert all(named[n].ndim == 4 for n in groups["decay"]["param_names"])
    assert groups["decay"]["weight_decay"] == 2e-5 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["clipping"] == 0.01 and groups["decay_noclip"]["clipping"] is None
    # params are the model's tensors, each exactly once
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in named.values())
    summary = describe_param_groups(list(groups.values()))
    assert sum(s["num_params"] for s in summary) == sum(p.numel() for p in named.values())
    # accepted by torch optimizers (param_names kept)
    opt = torch.optim.SGD(list(groups.values()), lr=0.4, momentum=0.9, nesterov=True)
    assert opt.state_dict()["param_groups"][0]["param_names"]


def test_bn_baseline_is_never_clipped() -> None:
    model = normfree.create_model("bn_resnet_cifar20", num_classes=10)
    assert model.meta.recipe["agc"] is False
    groups = build_param_groups(model, lr=0.1, weight_decay=1e-4, clipping=0.01)
    assert all(g["clipping"] is None for g in groups)


def test_fixup_scalars_get_a_tenth_of_the_lr() -> None:
    model = normfree.create_model("fixup_resnet_cifar20", num_classes=10)
    groups = build_param_groups(model, lr=0.1, weight_decay=1e-4, clipping=None)
    for g in groups:
        for name in g["param_names"]:
            assert g["lr_scale"] == model.lr_scale(name)
            assert g["lr"] == pytest.approx(0.1 * model.lr_scale(name), abs=1e-15)
    scaled = {n for g in groups if g["lr_scale"] == 0.1 for n in g["param_names"]}
    assert scaled and all(model.lr_scale(n) == 0.1 for n in scaled)
    assert "head.fc.weight" not in scaled


def test_extra_exclusions_and_errors() -> None:
    model = normfree.create_model("nf_resnet_cifar20", num_classes=10)
    groups = build_param_groups(
        model, lr=0.1, weight_decay=1e-4, extra_no_weight_decay=["stem.conv.weight"]
    )
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert "stem.conv.weight" in no_decay
    with pytest.raises(ValueError, match="unknown parameters"):
        build_param_groups(model, lr=0.1, weight_decay=0.0, extra_no_weight_decay=["nope"])
    with pytest.raises(ValueError, match="lr"):
        build_param_groups(model, lr=0.0, weight_decay=0.0)
    with pytest.raises(ValueError, match="clipping"):
        build_param_groups(model, lr=0.1, weight_decay=0.0, clipping=-1.0)


def test_one_extra_name_is_a_name_not_its_characters() -> None:
    model = normfree.create_model("nf_resnet_cifar20")
    groups = build_param_groups(model, 0.1, 5e-5, extra_no_weight_decay="stem.conv.weight")
    listed = build_param_groups(model, 0.1, 5e-5, extra_no_weight_decay=["stem.conv.weight"])
    assert [[id(p) for p in g["params"]] for g in groups] == [
        [id(p) for p in g["params"]] for g in listed
    ]
    undecayed = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert any(p is model.stem.conv.weight for p in undecayed)


def test_the_official_split_clips_the_classifier_bias_with_the_biases() -> None:
    """clip_classifier="bias": DeepMind's experiment_nfnets.py leaves only the final linear
    weight unclipped; its bias falls in the gains-and-biases group (the nfnet_imagenet
    recipe)."""
    model = normfree.create_model("nf_resnet_cifar20", num_classes=10)
    scalars_vectors = {n for n, p in model.named_parameters() if p.ndim <= 1}
    official = _by_name(build_param_groups(model, lr=0.4, weight_decay=2e-5, clipping=0.01,
                                           clip_classifier="bias"))  # fmt: skip
    assert set(official) == {"decay", "no_decay", "decay_noclip"}
    assert set(official["decay_noclip"]["param_names"]) == {"head.fc.weight"}
    assert set(official["no_decay"]["param_names"]) == scalars_vectors
    clipped = _by_name(build_param_groups(model, lr=0.4, weight_decay=0.0, clipping=0.01,
                                          clip_classifier=True))  # fmt: skip
    assert all(g["clipping"] == 0.01 for g in clipped.values())
