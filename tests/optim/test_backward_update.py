"""The SGD step of the Scaled-WS weights inside their native backward, fused with AGC
(normfree.optim.update_in_backward): the same weights, momentum buffers and optimizer state as
AGC followed by ``optimizer.step()`` (float64, several steps, every SGD option), no gradient
for the weights it updates, the plain path where it does not apply, and a clear error for each
use it cannot serve."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normfree
from normfree.nn import ScaledStdConv2d, native
from normfree.optim import attach_agc, attach_msr, update_in_backward


@pytest.fixture(scope="module")
def kernels():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with native.native_kernels(True) as on:
            if not on:
                pytest.skip("no C++ compiler/OpenMP here: the native kernels cannot be built")
    with native.native_kernels(True):
        yield


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = normfree.create_model(
        "nf_resnet_cifar20", num_classes=10, drop_path_rate=0.0, drop_rate=0.0
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 0:  # skip gains off zero, so that every branch carries a gradient
                p.fill_(0.3)
    return model


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=gen), torch.randint(
        0, 10, (4,), generator=gen
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, lrs=None) -> None:
    for step in steps:
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[step]
        x, y = _batch(step)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, ScaledStdConv2d)]


def _assert_same(a: nn.Module, b: nn.Module, oa, ob, adam: bool = False) -> None:
    """The parameters and the optimizer state of two float64 runs are equal to rounding. Adam
    divides by √v, which amplifies a rounding difference in a gradient where v is small: on
    this model its parameters differ by up to ≈ 2e-15 after three steps (≈ 1e-13 of the
    largest move; on nf_resnet26 ≈ 2e-13, and ≈ 4e-12 relative in the moments), so Adam's
    tolerances are 1e-13 absolute for the parameters and 1e-11 relative for the state."""
    atol, state_rtol = (1e-13, 1e-11) if adam else (1e-14, 1e-12)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k, state in sa["state"].items():
        assert state.keys() == sb["state"][k].keys(), k
        for name, value in state.items():
            if value is None:
                assert sb["state"][k][name] is None
                continue
            other = sb["state"][k][name]
            assert other.dtype == value.dtype and other.shape == value.shape, (k, name)
            torch.testing.assert_close(other, value, rtol=state_rtol, atol=1e-14)


SGD_OPTIONS = [
    {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    {"momentum": 0.9, "dampening": 0.2},
    {"momentum": 0.0},
    {"momentum": 0.5, "weight_decay": 1e-2, "maximize": True},
]


ADAM_OPTIONS = [
    (torch.optim.AdamW, {"weight_decay": 5e-2}),
    (torch.optim.AdamW, {"weight_decay": 1e-2, "amsgrad": True, "betas": (0.8, 0.95)}),
    (torch.optim.Adam, {"weight_decay": 1e-3, "maximize": True}),
    (torch.optim.Adam, {"eps": 1e-3, "amsgrad": True, "foreach": True}),
    (torch.optim.AdamW, {"weight_decay": 1e-2, "fused": True}),
]
OPTIMIZERS = [(torch.optim.SGD, {"lr": 0.2, **o}) for o in SGD_OPTIONS] + [
    (cls, {"lr": 1e-2, **o}) for cls, o in ADAM_OPTIONS
]


CASES = [
    pytest.param(cls, options, with_agc, id=f"{cls.__name__}-{i}-{'agc' if with_agc else 'plain'}")
    for i, (cls, options) in enumerate(OPTIMIZERS)
    for with_agc in (True, False)
]


@pytest.mark.parametrize(("cls", "options", "with_agc"), CASES)
def test_equals_agc_then_the_optimizer_step(
    kernels, cls: type[torch.optim.Optimizer], options: dict, with_agc: bool
) -> None:
    """Three steps (the learning rate changed between them, as a schedule would) give the same
    parameters and optimizer state (SGD's momentum buffers; Adam's step counts, moments and
    AMSGrad maxima, with their dtypes) as AGC followed by the optimizer's step, to 1e-12; the
    updated weights never hold a gradient, the others do; AGC changes the result (it
    clipped)."""
    plain = _model()
    fused = copy.deepcopy(plain)
    opts = [cls(m.parameters(), **options) for m in (plain, fused)]
    agcs = [attach_agc(o, clipping=0.01, model=m) if with_agc else None
            for o, m in zip(opts, (plain, fused))]  # fmt: skip
    handle = update_in_backward(opts[1], fused, agc=agcs[1])
    assert len(handle.weights) == len(_conv_weights(fused))
    lr = options["lr"]
    lrs = [lr, lr / 4, lr / 2]
    _train(plain, opts[0], range(3), lrs)
    for step in range(3):
        _train(fused, opts[1], range(step, step + 1), lrs)
        assert all(w.grad is None for w in _conv_weights(fused))
        assert any(p.grad is not None for p in fused.parameters())
    _assert_same(plain, fused, opts[0], opts[1], adam=cls is not torch.optim.SGD)
    if cls is not torch.optim.SGD:
        state = opts[1].state[_conv_weights(fused)[0]]
        assert float(state["step"]) == 3.0
        assert ("max_exp_avg_sq" in state) == opts[1].defaults["amsgrad"]
    if with_agc:  # the same steps without AGC end elsewhere: it clipped
        unclipped = _model()
        _train(unclipped, cls(unclipped.parameters(), **options), range(3), lrs)
        w_plain, w_free = _conv_weights(plain)[3], _conv_weights(unclipped)[3]
        assert (w_plain - w_free).abs().max() > 1e-6


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.AdamW])
def test_float32_is_as_accurate_as_the_plain_step(kernels, cls) -> None:
    """In float32 the fused step is as accurate as AGC + ``opt.step()``: after three steps each
    parameter is as close to the float64 run of the same training as the plain float32 run is
    (measured: within 1.05× of its distance per parameter for AdamW and 1.09× for SGD where
    that distance is over 1e-9, the same largest distance, ≈ 2e-7 / 1e-7)."""
    kwargs = {"lr": 1e-3, "weight_decay": 0.05} if cls is torch.optim.AdamW else {"lr": 0.1,
              "momentum": 0.9}  # fmt: skip
    models = []
    for _ in range(3):
        torch.manual_seed(0)
        models.append(
            normfree.create_model(
                "nf_resnet_cifar20", num_classes=10, drop_path_rate=0.0, drop_rate=0.0
            )
        )
    models[2].double()
    opts = [cls(m.parameters(), **kwargs) for m in models]
    agcs = [attach_agc(o, clipping=0.01, model=m) for o, m in zip(opts, models)]
    update_in_backward(opts[1], models[1], agc=agcs[1])
    for model, opt in zip(models, opts):
        for step in range(3):
            x, y = _batch(step)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y).backward()
            opt.step()
    worst = [0.0, 0.0]
    for (name, plain), fused, exact in zip(
        models[0].named_parameters(), models[1].parameters(), models[2].parameters()
    ):
        errors = [float((p.detach().double() - exact.detach()).abs().max()) for p in (plain, fused)]
        assert errors[1] <= 2.0 * errors[0] + 1e-9, (name, errors)
        worst = [max(w, e) for w, e in zip(worst, errors)]
    assert worst[1] <= 1.1 * worst[0], worst


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.AdamW])
def test_grouped_and_depthwise_convs(kernels, cls) -> None:
    """NF-RegNet-B0's grouped and depthwise Scaled-WS convs (rows of 9 to 72 weights, 16 of its
    54 convs) are updated in the backward like the dense ones: two steps equal AGC + the
    optimizer's step (float64)."""
    torch.manual_seed(0)
    base = normfree.create_model(
        "nf_regnet_b0", num_classes=10, drop_path_rate=0.0, drop_rate=0.0
    ).double()
    assert sum(m.groups > 1 for m in base.modules() if isinstance(m, ScaledStdConv2d)) == 16
    models = [base, copy.deepcopy(base)]
    kwargs = {"lr": 0.1, "momentum": 0.9} if cls is torch.optim.SGD else {"lr": 1e-3}
    opts = [cls(m.parameters(), **kwargs) for m in models]
    agcs = [attach_agc(o, clipping=0.01, model=m) for o, m in zip(opts, models)]
    handle = update_in_backward(opts[1], models[1], agc=agcs[1])
    assert len(handle.weights) == 54
    for model, opt in zip(models, opts):
        _train(model, opt, range(2))
    assert all(w.grad is None for w in _conv_weights(models[1]))
    _assert_same(models[0], models[1], opts[0], opts[1], adam=cls is not torch.optim.SGD)


def test_param_groups_exclusions_frozen_gains_and_floored_rows(kernels) -> None:
    """Per-group learning rates, momenta and weight decay; a conv excluded from AGC by name, a
    group with ``clipping=None``, a frozen gain (its gradient not asked for) and a constant
    weight row (under the Scaled-WS floor): the same parameters and buffers as AGC + SGD's
    step, to 1e-12 (float64, three steps)."""
    models = [_model(), _model()]
    opts, agcs = [], []
    for model in models:
        convs = [m for m in model.modules() if isinstance(m, ScaledStdConv2d)]
        with torch.no_grad():
            convs[5].weight[3].fill_(0.25)  # N·var = 0: the floored row
        convs[2].gain.requires_grad_(False)
        first = {id(c.weight) for c in convs[: len(convs) // 2]}
        rest = [p for p in model.parameters() if id(p) not in first and p.requires_grad]
        groups = [
            {"params": [c.weight for c in convs[: len(convs) // 2]], "lr": 0.2,
             "weight_decay": 1e-3},
            {"params": rest, "lr": 0.05, "momentum": 0.5, "clipping": None},
        ]  # fmt: skip
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=False)
        name = next(n for n, p in model.named_parameters() if p is convs[1].weight)
        agcs.append(attach_agc(opt, clipping=0.01, exclude=[name], model=model))
        opts.append(opt)
    handle = update_in_backward(opts[1], models[1], agc=agcs[1])
    assert len(handle.weights) == len(_conv_weights(models[1]))
    for model, opt in zip(models, opts):
        _train(model, opt, range(3))
    _assert_same(models[0], models[1], opts[0], opts[1])


def test_actions_attached_later_are_refused_before_a_weight_moves(kernels) -> None:
    """A Mean Shift Rejection attached after the update began is refused in the backward,
    before any weight is changed."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    update_in_backward(opt, model)
    attach_msr(opt, model)
    before = [w.detach().clone() for w in _conv_weights(model)]
    x, y = _batch(0)
    with pytest.raises(RuntimeError, match="attached to the optimizer after"):
        F.cross_entropy(model(x), y).backward()
    assert all(torch.equal(a, w) for a, w in zip(before, _conv_weights(model)))


RESUMED = {
    "SGD": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "AdamW": (torch.optim.AdamW, {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-2}),
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_state_dict_and_a_resumed_optimizer(kernels, name: str) -> None:
    """The optimizer's state (SGD's momentum buffers; Adam's step counts, moments and maxima)
    lives in the optimizer: a run resumed from a checkpoint (model and optimizer state loaded
    into new objects, whose param-group dicts are new) continues exactly as the plain run;
    AdamW also from a checkpoint of a plain run (whose state has the same layout)."""
    cls, kwargs = RESUMED[name]
    plain, fused = _model(), _model()
    o_plain, o_fused = cls(plain.parameters(), **kwargs), cls(fused.parameters(), **kwargs)
    attach_agc(o_plain, model=plain)
    update_in_backward(o_fused, fused, agc=attach_agc(o_fused, model=fused))
    _train(plain, o_plain, range(2))
    _train(fused, o_fused, range(2))
    sources = [(fused, o_fused)] + ([(plain, o_plain)] if cls is not torch.optim.SGD else [])
    for source in sources:
        saved = copy.deepcopy((source[0].state_dict(), source[1].state_dict()))
        resumed = _model()
        resumed.load_state_dict(saved[0])
        o_resumed = cls(resumed.parameters(), **kwargs)
        agc = attach_agc(o_resumed, model=resumed)
        update_in_backward(o_resumed, resumed, agc=agc)
        o_resumed.load_state_dict(saved[1])
        reference = copy.deepcopy(plain)
        o_reference = cls(reference.parameters(), **kwargs)
        attach_agc(o_reference, model=reference)
        o_reference.load_state_dict(o_plain.state_dict())
        _train(reference, o_reference, range(2, 4))
        _train(resumed, o_resumed, range(2, 4))
        _assert_same(reference, resumed, o_reference, o_resumed, adam=cls is not torch.optim.SGD)


def test_adam_state_dtypes_and_per_group_settings(kernels) -> None:
    """Under a float64 default dtype Adam makes float64 step counts, except for a fused group
    (float32): the update in the backward makes them alike, and with per-group betas, eps,
    AMSGrad and fused flags the run equals AGC + ``opt.step()`` (three steps)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        models, opts = [_model(), _model()], []
        for model in models:
            convs = _conv_weights(model)
            first = {id(w) for w in convs[: len(convs) // 2]}
            groups = [
                {"params": convs[: len(convs) // 2], "fused": True, "betas": (0.8, 0.9)},
                {"params": [p for p in model.parameters() if id(p) not in first], "eps": 1e-4,
                 "amsgrad": True},
            ]  # fmt: skip
            opt = torch.optim.Adam(groups, lr=1e-2, weight_decay=1e-3)
            opts.append(opt)
        agcs = [attach_agc(o, clipping=0.01, model=m) for o, m in zip(opts, models)]
        update_in_backward(opts[1], models[1], agc=agcs[1])
        for model, opt in zip(models, opts):
            _train(model, opt, range(3))
    finally:
        torch.set_default_dtype(previous)
    _assert_same(models[0], models[1], opts[0], opts[1], adam=True)  # (dtypes included)
    convs = _conv_weights(models[1])
    assert opts[1].state[convs[0]]["step"].dtype == torch.float32
    assert opts[1].state[convs[-1]]["step"].dtype == torch.float64


def test_what_it_cannot_update_falls_back_or_is_refused_before_a_weight_moves(kernels) -> None:
    """A weight whose Adam state lacks its step count gets its gradient (the optimizer's step
    then deals with it, as PyTorch would); a ``capturable`` flag set on a group after the
    update began is refused at the next backward, before any weight moves."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    update_in_backward(opt, model)
    _train(model, opt, range(1))
    weights = _conv_weights(model)
    del opt.state[weights[2]]["step"]
    before = weights[2].detach().clone()
    x, y = _batch(1)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert weights[2].grad is not None and torch.equal(weights[2].detach(), before)
    assert all(w.grad is None for k, w in enumerate(weights) if k != 2)
    opt.state[weights[2]]["step"] = torch.tensor(1.0)
    opt.step()  # the plain step for that weight
    assert not torch.equal(weights[2].detach(), before)
    opt.zero_grad(set_to_none=True)
    opt.param_groups[0]["capturable"] = True
    before = [w.detach().clone() for w in weights]
    with pytest.raises(RuntimeError, match="capturable=True"):
        F.cross_entropy(model(x), y).backward()
    assert all(torch.equal(a, w) for a, w in zip(before, weights))


def test_plain_path_without_the_native_kernels_and_after_remove(kernels) -> None:
    """With the native kernels off, the weights get their gradients and ``optimizer.step()``
    updates them, with the same numbers; after ``remove()`` the same holds with them on."""
    plain, fused = _model(), _model()
    o_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    o_fused = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    handle = update_in_backward(o_fused, fused)
    with native.native_kernels(False):
        x, y = _batch(0)
        o_fused.zero_grad(set_to_none=True)
        F.cross_entropy(fused(x), y).backward()
        assert all(w.grad is not None for w in _conv_weights(fused))
        o_fused.step()
    _train(plain, o_plain, range(1))
    handle.remove()
    _train(plain, o_plain, range(1, 2))
    x, y = _batch(1)
    o_fused.zero_grad(set_to_none=True)
    F.cross_entropy(fused(x), y).backward()
    assert all(w.grad is not None for w in _conv_weights(fused))
    o_fused.step()
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)


def test_the_update_lives_as_long_as_the_optimizer(kernels) -> None:
    """The optimizer's step hooks hold the update, whose handle need not be kept; once the
    optimizer is gone (collected: nothing else holds it), the weights get gradients again."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    update_in_backward(opt, model)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    assert all(w.grad is None for w in _conv_weights(model))
    opt.step()
    gone = weakref.ref(opt)
    del opt
    gc.collect()
    assert gone() is None
    F.cross_entropy(model(x), y).backward()
    assert all(w.grad is not None for w in _conv_weights(model))


def test_a_second_live_update_on_the_same_weights_is_refused(kernels) -> None:
    """Two optimizers updating one model in the backward: the newest used to win silently, so
    stepping the older optimizer applied the newer one's step to the conv weights. An optimizer
    dropped but not yet collected (a notebook cell run again) no longer counts."""
    model = _model()
    first = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle = update_in_backward(first, model)
    second = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"already updated in the backward by BackwardUpdate"):
        update_in_backward(second, model)
    with pytest.raises(ValueError, match="call remove"):
        update_in_backward(first, model)  # a second handle on the same optimizer too
    handle.remove()
    update_in_backward(second, model)  # the weights are free again
    del second  # held in a cycle with its update: only the collector frees it
    update_in_backward(torch.optim.SGD(model.parameters(), lr=0.1), model)


def test_a_second_backward_before_the_step_raises(kernels) -> None:
    """Gradient accumulation cannot be served (the first backward already stepped): the second
    backward says so; after ``optimizer.step()`` the next backward runs."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    update_in_backward(opt, model)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="second backward"):
        F.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=True)
    opt.step()
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("extra", ["square", "linear"])
def test_a_weight_used_twice_is_never_updated_twice(kernels, extra: str) -> None:
    """A conv weight that also feeds another term of the loss is refused, never silently
    updated with part of its gradient: autograd refuses the weight the other term saved, or
    ``optimizer.step()`` refuses the other term's gradient (the weight was already updated with
    its conv's part: the docs say to restore a checkpoint). Where neither happens, the result
    must equal the plain path's."""
    plain, fused = _model(), _model()
    o_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    o_fused = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    update_in_backward(o_fused, fused)
    x, y = _batch(0)
    term = {"square": lambda w: w.square().sum(), "linear": lambda w: 3.0 * w.sum()}[extra]
    for model, opt in ((plain, o_plain), (fused, o_fused)):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + term(_conv_weights(model)[-1])
        try:
            loss.backward()
            opt.step()
        except RuntimeError as err:
            assert model is fused
            message = str(err)
            assert "modified by an inplace operation" in message or "another use" in message
            return
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


def test_clear_errors_for_what_it_cannot_serve() -> None:
    model = _model()
    with pytest.raises(TypeError, match=r"torch\.optim\.SGD, Adam or AdamW; got RMSprop"):
        update_in_backward(torch.optim.RMSprop(model.parameters()), model)
    with pytest.raises(ValueError, match="capturable=True"):
        update_in_backward(torch.optim.AdamW(model.parameters(), capturable=True), model)
    with pytest.raises(ValueError, match="differentiable=True"):
        update_in_backward(torch.optim.SGD(model.parameters(), lr=0.1, differentiable=True), model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_agc(opt, model=model)
    with pytest.raises(ValueError, match=r"pass it as agc="):
        update_in_backward(opt, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_msr(opt, model)
    with pytest.raises(ValueError, match="MeanShiftRejection"):
        update_in_backward(opt, model)
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"no float32/float64 Scaled-WS conv weight"):
        update_in_backward(torch.optim.SGD(other.parameters(), lr=0.1), model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="same optimizer"):
        update_in_backward(opt, model, agc=attach_agc(torch.optim.SGD(model.parameters(), lr=1)))


def test_adamw_of_torch_before_2_7_takes_the_decoupled_adam_step(
    kernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch 2.3–2.6 (the declared range starts at 2.3) define ``AdamW`` as its own
    ``Optimizer``, not a subclass of ``Adam``, and its param groups have no
    ``"decoupled_weight_decay"`` key. Emulated here: the in-backward step of such an AdamW is
    still Adam's with decoupled weight decay, the weights equal those of today's AdamW step
    (float64, three steps, weight decay large enough that L2 decay would differ)."""
    import normfree.optim.backward_update as module

    real = torch.optim.AdamW

    class AdamW(torch.optim.Optimizer):  # the torch 2.6 class: its defaults, its own step
        def __init__(self, params, lr=1e-3, weight_decay=1e-2) -> None:
            defaults = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                            amsgrad=False, maximize=False, foreach=None, capturable=False,
                            differentiable=False, fused=None)  # fmt: skip
            super().__init__(params, defaults)

        def step(self, closure=None) -> None:  # only the conv weights, updated in the backward
            assert all(p.grad is None for g in self.param_groups for p in g["params"])

    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    monkeypatch.setattr(module, "_OPTIMIZERS", (torch.optim.SGD, torch.optim.Adam, AdamW))
    old, new = _model(), None
    new = copy.deepcopy(old)
    opt_old = AdamW(_conv_weights(old), lr=1e-2, weight_decay=0.5)
    assert "decoupled_weight_decay" not in opt_old.param_groups[0]
    update_in_backward(opt_old, old)
    opt_new = real(_conv_weights(new), lr=1e-2, weight_decay=0.5)
    for step in range(3):
        for model, opt in ((old, opt_old), (new, opt_new)):
            x, y = _batch(step)
            opt.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.grad = None
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(_conv_weights(old), _conv_weights(new)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert float(opt_old.state[_conv_weights(old)[0]]["step"]) == 3.0


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.AdamW])
def test_autocast_steps_read_the_bfloat16_gradients(
    kernels, monkeypatch: pytest.MonkeyPatch, cls
) -> None:
    """Under CPU autocast (bfloat16) each conv's Ŵ is written as bfloat16 and the fused step
    reads the bfloat16 ∂L/∂Ŵ as the convolution returns it: after three steps the parameters
    and the optimizer state are bit for bit those of the same steps with a float32 Ŵ that
    autocast casts (whose backward widens the gradient before the step reads it)."""
    import normfree.nn.ws as ws_module
    import normfree.nn.ws_functional as functional

    kwargs = {"lr": 1e-3, "weight_decay": 0.05} if cls is torch.optim.AdamW else {"lr": 0.1,
              "momentum": 0.9}  # fmt: skip
    outputs: list[torch.dtype] = []
    native_standardize = functional._native_standardize

    def recording(*args, **kwargs):
        result = native_standardize(*args, **kwargs)
        outputs.append(result[0].dtype)
        return result

    monkeypatch.setattr(functional, "_native_standardize", recording)
    runs = []
    for cast_by_autocast in (False, True):
        if cast_by_autocast:
            # the first run handed every conv a bfloat16 Ŵ from the kernel, three steps long
            convs = len(_conv_weights(runs[0][0]))
            assert outputs == [torch.bfloat16] * (3 * convs)
            outputs.clear()
            monkeypatch.setattr(ws_module, "cpu_autocast_dtype", lambda weight: None)
        torch.manual_seed(0)
        model = normfree.create_model(
            "nf_resnet_cifar20", num_classes=10, drop_path_rate=0.0, drop_rate=0.0
        )
        start = [w.detach().clone() for w in _conv_weights(model)]
        opt = cls(model.parameters(), **kwargs)
        update_in_backward(opt, model, agc=attach_agc(opt, clipping=0.01, model=model))
        for step in range(3):
            x, y = _batch(step)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x.float()), y)
            loss.backward()
            assert all(w.grad is None for w in _conv_weights(model))  # stepped in the backward
            opt.step()
        assert all(not torch.equal(a, b) for a, b in zip(start, _conv_weights(model)))
        runs.append((model, opt))
    assert outputs == [torch.float32] * (3 * len(_conv_weights(runs[1][0])))
    (model_a, opt_a), (model_b, opt_b) = runs
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert state_a.keys() == state_b.keys()
        for key, value in state_a.items():
            assert torch.equal(value, state_b[key]), key


def test_an_agc_removed_clips_these_weights_no_more(kernels) -> None:
    """``agc.remove()`` after the update began stops the clipping of every parameter, the
    weights updated in the backward included: the following steps equal plain SGD's."""
    plain, fused = _model(), _model()
    opts = [torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9) for m in (plain, fused)]
    agcs = [attach_agc(o, clipping=0.01, model=m) for o, m in zip(opts, (plain, fused))]
    update_in_backward(opts[1], fused, agc=agcs[1])
    for model, opt, agc in zip((plain, fused), opts, agcs):
        _train(model, opt, range(1))
        agc.remove()
        _train(model, opt, range(1, 3))
    _assert_same(plain, fused, opts[0], opts[1])


def test_gradients_taken_without_accumulating_them_move_no_weight(kernels) -> None:
    """``torch.autograd.grad`` (which returns the gradients) and ``backward(inputs=...)``
    without the conv weights apply no step: the weights stay, and the returned gradients are
    the plain backward's."""
    plain, fused = _model(), _model()
    opt = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    update_in_backward(opt, fused)
    before = [w.detach().clone() for w in _conv_weights(fused)]
    x, y = _batch(0)
    expected = torch.autograd.grad(F.cross_entropy(plain(x), y), list(plain.parameters()))
    got = torch.autograd.grad(F.cross_entropy(fused(x), y), list(fused.parameters()))
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    gains = [m.gain for m in fused.modules() if isinstance(m, ScaledStdConv2d)]
    torch.autograd.grad(F.cross_entropy(fused(x), y), gains)
    F.cross_entropy(fused(x), y).backward(inputs=gains)
    assert all(torch.equal(a, w) for a, w in zip(before, _conv_weights(fused)))
    assert all(w.grad is None for w in _conv_weights(fused)) and not opt.state


def test_a_weight_used_twice_under_a_closure_is_refused(kernels) -> None:
    """``optimizer.step(closure)`` runs the backward inside the step: a conv weight that also
    received a gradient from another term is refused there too, before the step applies it a
    second time."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    update_in_backward(opt, model)
    x, y = _batch(0)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + 3.0 * _conv_weights(model)[-1].sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="another use"):
        opt.step(closure)
