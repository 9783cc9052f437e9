"""Adaptive gradient clipping: functional form against a slow float64 reference, and the step
hook attached to an optimizer."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import normfree
from normfree.optim import attached, fused_available
from normfree.optim.agc import (
    AGC,
    _adaptive_clip_grad,
    adaptive_clip_grad_,
    attach_agc,
    unitwise_norm,
)


# --------------------------------------------------------------------------------------------
# Reference and fixtures
# --------------------------------------------------------------------------------------------
def reference_agc(
    param: torch.Tensor, grad: torch.Tensor, clipping: float = 0.01, eps: float = 1e-3
) -> torch.Tensor:
    """Per-parameter float64 AGC (Brock et al. 2021b, Eq. 3), written out unit by unit."""
    w, g = param.detach().double(), grad.detach().double()
    if w.ndim <= 1:
        w_units, g_units = w.reshape(1, -1), g.reshape(1, -1)
    else:
        w_units, g_units = w.reshape(w.shape[0], -1), g.reshape(g.shape[0], -1)
    out = g_units.clone()
    for i in range(w_units.shape[0]):
        max_norm = clipping * max(w_units[i].norm().item(), eps)
        g_norm = g_units[i].norm().item()
        if g_norm > max_norm:
            out[i] = g_units[i] * (max_norm / max(g_norm, 1e-6))
    return out.reshape(g.shape)


class PlainNet(nn.Module):
    """Every parameter layout AGC meets: conv 4-D, conv3d 5-D, linear 2-D, (C,) gains, scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.conv3d = nn.Conv3d(2, 3, (1, 2, 2), bias=False)
        self.gain = nn.Parameter(torch.ones(6))
        self.skip_gain = nn.Parameter(torch.zeros(()))
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x) * self.gain.view(1, -1, 1, 1) * (1 + self.skip_gain)
        return self.fc(h.flatten(1)[:, :24])


class TinyNet(PlainNet):
    """PlainNet that declares its classifier, as normfree models do."""

    def classifier_parameter_names(self) -> list[str]:
        return ["fc.weight", "fc.bias"]


def random_grads(model: nn.Module, seed: int, dtype: torch.dtype = torch.float32) -> None:
    """Gradients whose unit norms are spread log-uniformly over 1e-5..1e-1 of the weight scale,
    so that with λ = 0.01 some units are clipped and some are not."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        with torch.no_grad():
            p.normal_(0.0, 0.2, generator=gen)
        units = p.shape[0] if p.ndim >= 2 else 1
        mag = 10 ** (-5 + 4 * torch.rand(units, generator=gen, dtype=torch.float64))
        mag = mag.view((-1,) + (1,) * (p.ndim - 1)) if p.ndim >= 2 else mag.view(())
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * mag).to(dtype)


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------
# Functional form
# --------------------------------------------------------------------------------------------
def test_unitwise_norm_layouts() -> None:
    w = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(unitwise_norm(w), w.flatten(1).norm(dim=1).view(4, 1, 1, 1))
    g = torch.randn(7)
    assert unitwise_norm(g).shape == () and unitwise_norm(g) == pytest.approx(g.norm().item())
    assert unitwise_norm(torch.tensor(-2.0)).item() == 2.0
    assert unitwise_norm(torch.randn(5, 3, dtype=torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_slow_reference(seed: int, dtype: torch.dtype) -> None:
    model = TinyNet().to(dtype)
    random_grads(model, seed, dtype)
    before = grads_of(model)
    expected = {n: reference_agc(p, before[n]) for n, p in model.named_parameters()}
    adaptive_clip_grad_(model.parameters(), clipping=0.01, eps=1e-3)
    tol = {"rtol": 1e-12, "atol": 0.0} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 0.0}
    changed = unchanged = 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[n], **tol)
        if p.ndim >= 2:
            rows = (p.grad != before[n]).flatten(1).any(dim=1)
            changed += int(rows.sum())
            unchanged += int((~rows).sum())
    assert changed > 0 and unchanged > 0  # the test exercises both branches


def test_skip_and_no_skip_paths_agree() -> None:
    a, b = TinyNet(), TinyNet()
    random_grads(a, 7)
    b.load_state_dict(a.state_dict())
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.grad = pa.grad.clone()
    _adaptive_clip_grad(list(a.parameters()), 0.01, 1e-3, skip_unclipped=True)
    _adaptive_clip_grad(list(b.parameters()), 0.01, 1e-3, skip_unclipped=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_gradients_that_carry_a_graph_are_clipped_in_place() -> None:
    """``backward(create_graph=True)`` leaves gradients that require grad: AGC clips their
    values in place like any other (the reference on the same numbers), and an empty list of
    parameters is a no-op."""
    model = TinyNet()
    random_grads(model, 3)
    for p in model.parameters():
        p.grad = p.grad.clone().requires_grad_()  # as create_graph=True leaves them
    before = grads_of(model)
    expected = {n: reference_agc(p, before[n]) for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    adaptive_clip_grad_(model.parameters(), clipping=0.01, eps=1e-3)
    for n, p in model.named_parameters():
        assert p.grad is grads[n] and p.grad.requires_grad  # the same tensors, changed in place
        torch.testing.assert_close(p.grad.detach().double(), expected[n], rtol=2e-6, atol=0.0)
    assert any(not torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    _adaptive_clip_grad([], 0.01, 1e-3)


@pytest.mark.parametrize("shape", [(2, 3), (3,)])
def test_clipping_condition_both_ways(shape: tuple[int, ...]) -> None:
    clipping = 0.01
    p = nn.Parameter(torch.randn(shape, dtype=torch.float64))
    w_norm = p.detach().flatten(1).norm(dim=1) if p.ndim >= 2 else p.detach().norm().view(1)
    direction = torch.randn(shape, dtype=torch.float64)
    units = direction.reshape(len(w_norm), -1)
    units = units / units.norm(dim=1, keepdim=True)
    for factor, clipped in [(1 - 1e-6, False), (1 + 1e-6, True), (2.0, True), (0.5, False)]:
        g = units * (clipping * w_norm * factor).unsqueeze(1)
        p.grad = g.reshape(shape).clone()
        adaptive_clip_grad_([p], clipping=clipping)
        got = p.grad.reshape(len(w_norm), -1)
        if clipped:
            torch.testing.assert_close(got.norm(dim=1), clipping * w_norm, rtol=1e-12, atol=0)
            torch.testing.assert_close(got / got.norm(dim=1, keepdim=True), units)
        else:
            assert torch.equal(got, g)


def test_zero_initialised_parameters_are_not_zeroed() -> None:
    w = nn.Parameter(torch.zeros(3, 4))
    s = nn.Parameter(torch.zeros(()))
    w.grad = torch.randn(3, 4)
    s.grad = torch.tensor(5.0)
    adaptive_clip_grad_([w, s], clipping=0.01, eps=1e-3)
    torch.testing.assert_close(w.grad.norm(dim=1), torch.full((3,), 1e-5), rtol=1e-6, atol=0)
    assert s.grad.item() == pytest.approx(1e-5, rel=1e-6)


def test_parameters_without_grad_are_skipped() -> None:
    model = TinyNet()
    random_grads(model, 3)
    model.conv3d.weight.grad = None
    model.gain.grad = None
    adaptive_clip_grad_(model.parameters())
    assert model.conv3d.weight.grad is None and model.gain.grad is None
    adaptive_clip_grad_([nn.Parameter(torch.ones(2))])  # nothing to do: no error
    empty = nn.Parameter(torch.empty(0, 3))
    empty.grad = torch.empty(0, 3)
    adaptive_clip_grad_([empty, model.conv.weight])  # empty tensors are ignored


def test_mixed_dtypes_in_one_call() -> None:
    w32 = nn.Parameter(torch.randn(3, 4))
    w64 = nn.Parameter(torch.randn(5, 2, dtype=torch.float64))
    w32.grad, w64.grad = torch.randn(3, 4), torch.randn(5, 2, dtype=torch.float64)
    expected = [reference_agc(w, w.grad) for w in (w32, w64)]
    adaptive_clip_grad_([w32, w64])
    torch.testing.assert_close(w32.grad.double(), expected[0], rtol=2e-6, atol=0)
    torch.testing.assert_close(w64.grad, expected[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grads(dtype: torch.dtype) -> None:
    model = TinyNet().to(dtype)
    random_grads(model, 5, dtype)
    before = grads_of(model)
    adaptive_clip_grad_(model.parameters())
    for n, p in model.named_parameters():
        assert p.grad.dtype == dtype
        expected = reference_agc(p, before[n]).to(dtype)  # the reference, rounded once
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(p.grad.double(), expected.double(), rtol=2 * eps, atol=1e-7)


def test_low_precision_params() -> None:
    w = nn.Parameter(torch.randn(4, 8, dtype=torch.bfloat16))
    w.grad = torch.randn(4, 8, dtype=torch.bfloat16)
    expected = reference_agc(w, w.grad).to(torch.bfloat16)
    adaptive_clip_grad_([w])
    torch.testing.assert_close(w.grad, expected, rtol=0.01, atol=1e-7)


def test_bad_arguments() -> None:
    p = nn.Parameter(torch.ones(2, 2))
    p.grad = torch.ones(2, 2)
    with pytest.raises(ValueError, match="clipping"):
        adaptive_clip_grad_([p], clipping=0.0)
    with pytest.raises(ValueError, match="eps"):
        adaptive_clip_grad_([p], eps=-1.0)
    with pytest.raises(TypeError, match="tensors"):
        adaptive_clip_grad_([1.0])  # type: ignore[list-item]
    emb = nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        adaptive_clip_grad_(emb.parameters())


# --------------------------------------------------------------------------------------------
# AGC wrapper
# --------------------------------------------------------------------------------------------
def twin_models(seed: int = 0) -> tuple[TinyNet, TinyNet]:
    a = TinyNet()
    random_grads(a, seed)
    b = copy.deepcopy(a)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.grad = pa.grad.clone()
    return a, b


def with_agc(optimizer: torch.optim.Optimizer, **kwargs: object) -> torch.optim.Optimizer:
    """``optimizer`` with AGC attached through its step pre-hook."""
    attach_agc(optimizer, **kwargs)  # type: ignore[arg-type]
    return optimizer


def test_hook_equals_functional_then_step() -> None:
    a, b = twin_models()
    opt_a = with_agc(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), exclude=())
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    opt_a.step()
    adaptive_clip_grad_(b.parameters())
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_hook_with_adamw() -> None:
    a, b = twin_models(1)
    opt_a = with_agc(torch.optim.AdamW(a.parameters(), lr=1e-2), model=a)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    opt_a.step()
    adaptive_clip_grad_(p for n, p in b.named_parameters() if not n.startswith("fc."))
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize(
    ("exclude", "excluded"),
    [
        (None, {"fc.weight", "fc.bias"}),  # the model's declared classifier
        ((), set()),
        ("fc.weight", {"fc.weight"}),
        (["conv*", "gain"], {"conv.weight", "conv.bias", "conv3d.weight", "gain"}),
        (lambda name, p: p.ndim == 0, {"skip_gain"}),
    ],
)
def test_exclusions(exclude: object, excluded: set[str]) -> None:
    model = TinyNet()
    random_grads(model, 2)
    before = grads_of(model)
    opt = AGC(torch.optim.SGD(model.parameters(), lr=0.0), exclude=exclude, model=model)
    assert set(opt.excluded_names) == excluded
    opt.clip_grad_()
    for n, p in model.named_parameters():
        if n in excluded:
            assert torch.equal(p.grad, before[n]), n
        else:
            torch.testing.assert_close(
                p.grad.double(), reference_agc(p, before[n]), rtol=2e-6, atol=0
            )


def test_exclusion_errors_and_models_without_classifier() -> None:
    model = TinyNet()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="matches no parameter"):
        AGC(sgd, exclude=["head.*"], model=model)
    with pytest.raises(ValueError, match="model="):
        AGC(sgd, exclude=["fc.*"])
    with pytest.raises(ValueError, match="model="):
        AGC(sgd, exclude=lambda n, p: True)
    with pytest.raises(TypeError):
        AGC(sgd, exclude=[3], model=model)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="Optimizer"):
        AGC(object())  # type: ignore[arg-type]
    plain = PlainNet()
    assert AGC(torch.optim.SGD(plain.parameters(), lr=0.1), model=plain).excluded_names == []


def test_per_group_clipping() -> None:
    model = TinyNet()
    random_grads(model, 4)
    before = grads_of(model)
    groups = [
        {"params": [model.conv.weight, model.conv.bias]},  # wrapper default 0.01
        {"params": [model.conv3d.weight, model.gain], "clipping": 0.1},
        {"params": [model.skip_gain, model.fc.weight, model.fc.bias], "clipping": None},
    ]
    opt = torch.optim.SGD(groups, lr=0.0)
    agc = AGC(opt, clipping=0.01, exclude=())
    assert [g["clipping"] for g in opt.param_groups] == [0.01, 0.1, None]
    agc.clip_grad_()
    for n, p in model.named_parameters():
        if n in ("conv.weight", "conv.bias"):
            expected = reference_agc(p, before[n], clipping=0.01)
        elif n in ("conv3d.weight", "gain"):
            expected = reference_agc(p, before[n], clipping=0.1)
        else:
            expected = before[n].double()
        torch.testing.assert_close(p.grad.double(), expected, rtol=2e-6, atol=0)
    with pytest.raises(ValueError, match="clipping"):
        AGC(torch.optim.SGD([{"params": [model.gain], "clipping": -1.0}], lr=0.1))


def test_add_param_group_gets_default_clipping() -> None:
    model = TinyNet()
    random_grads(model, 6)
    before = grads_of(model)
    opt = torch.optim.SGD([model.conv.weight], lr=0.0)
    agc = attach_agc(opt, clipping=0.05)
    opt.add_param_group({"params": [model.gain]})  # no "clipping" key: the default applies
    agc.clip_grad_()
    for n in ("conv.weight", "gain"):
        p = dict(model.named_parameters())[n]
        expected = reference_agc(p, before[n], clipping=0.05)
        torch.testing.assert_close(p.grad.double(), expected, rtol=2e-6, atol=0)


@pytest.mark.parametrize("kind", ["lambda", "cosine"])
def test_lr_schedulers_with_the_hook(kind: str) -> None:
    model = TinyNet()
    inner = opt = torch.optim.SGD(model.parameters(), lr=0.4)
    AGC(opt, model=model)
    if kind == "lambda":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
        expected = [0.4 / (k + 2) for k in range(3)]
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
        expected = [0.2 * (1 + math.cos(math.pi * (k + 1) / 4)) for k in range(3)]
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for k in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            sched.step()
            assert inner.param_groups[0]["lr"] == pytest.approx(expected[k], rel=1e-12)


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.randn(4, 3, 4, 4)
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.startswith("fc")]},
        {"params": list(model.fc.parameters()), "clipping": None},
    ]
    opt = with_agc(torch.optim.SGD(groups, lr=0.1, momentum=0.9), clipping=0.02)

    def train(m: nn.Module, o: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()

    train(model, opt, 2)
    clone = copy.deepcopy(model)
    groups2 = [
        {"params": [p for n, p in clone.named_parameters() if not n.startswith("fc")]},
        {"params": list(clone.fc.parameters())},
    ]
    opt2 = with_agc(torch.optim.SGD(groups2, lr=1.0, momentum=0.5), clipping=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # buffers are not copied on load
    assert [g["clipping"] for g in opt2.param_groups] == [0.02, None]
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["momentum"] == 0.9
    buffers = 0
    for p, q in zip(model.parameters(), clone.parameters()):
        if p in opt.state:
            assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
            buffers += 1
    assert buffers == len(list(model.parameters())) - 1  # conv3d is unused: no gradient
    train(model, opt, 2)
    train(clone, opt2, 2)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_closure_gradients_are_clipped() -> None:
    a, b = twin_models()
    x = torch.randn(2, 3, 4, 4)
    opt_a = with_agc(torch.optim.SGD(a.parameters(), lr=0.1), exclude=())
    opt_b = with_agc(torch.optim.SGD(b.parameters(), lr=0.1), exclude=())

    def closure() -> torch.Tensor:
        opt_a.zero_grad()
        loss = a(x).square().mean() * 100
        loss.backward()
        return loss

    loss = opt_a.step(closure)
    assert isinstance(loss, torch.Tensor)
    opt_b.zero_grad()
    (b(x).square().mean() * 100).backward()
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_grad_scaler_clips_unscaled_gradients() -> None:
    scaler_cls = getattr(torch.amp, "GradScaler", None)
    if scaler_cls is None:
        pytest.skip("torch.amp.GradScaler unavailable")
    a, b = twin_models()
    x = torch.randn(2, 3, 4, 4)
    opt_a = with_agc(torch.optim.SGD(a.parameters(), lr=0.1), model=a)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    scaler = scaler_cls("cpu", init_scale=2.0**12)
    opt_a.zero_grad()
    scaler.scale(a(x).square().mean()).backward()
    scaler.step(opt_a)  # unscale_ → AGC → SGD
    scaler.update()
    # Reference: unscaled gradients, clipped by the slow reference, plain SGD.
    opt_b.zero_grad()
    b(x).square().mean().backward()
    with torch.no_grad():
        for n, p in b.named_parameters():
            if p.grad is not None and not n.startswith("fc."):
                p.grad.copy_(reference_agc(p, p.grad))
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-8)
    # Non-finite gradients: the scaler skips the step and AGC leaves the parameters alone.
    before = [p.detach().clone() for p in a.parameters()]
    opt_a.zero_grad()
    scaler.scale(a(x).square().mean() * float("inf")).backward()
    scaler.step(opt_a)
    scaler.update()
    for p, q in zip(a.parameters(), before):
        assert torch.equal(p, q)
    assert scaler.get_scale() == 2.0**11


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.AdamW])
def test_fused_optimizer_under_grad_scaler_clips_like_the_loop(cls: type) -> None:
    """``GradScaler.step`` does not unscale before a fused optimizer's step (its kernel
    unscales by ``optimizer.grad_scale``), so AGC's pre-hook sees gradients still scaled by
    S = 2¹²; it must clip them at λ‖W‖·S. Against the per-tensor loop, which the scaler
    unscales first: scaling by a power of two is exact, so both agree to float32 rounding
    (fused SGD bit for bit on the hosts measured; the kernels may contract a multiply-add
    differently elsewhere, so the check allows a few ulps). Without the scaled threshold the
    scaled gradients are all clipped and the step is 2¹² times too small (weights 1.7e-3
    apart after three steps)."""
    if not fused_available(cls, [torch.zeros(1)]):
        pytest.skip(f"no fused CPU {cls.__name__} in torch {torch.__version__}")
    a, b = twin_models()
    x = torch.randn(2, 3, 4, 4)
    kw = {"lr": 0.1, "momentum": 0.9} if cls is torch.optim.SGD else {"lr": 0.01}
    opt_a = with_agc(cls(a.parameters(), fused=True, **kw), exclude=())
    opt_b = with_agc(cls(b.parameters(), foreach=False, **kw), exclude=())
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2)]
    clipped = 0
    for _ in range(3):
        for model, opt, scaler in zip((a, b), (opt_a, opt_b), scalers):
            opt.zero_grad()
            scaler.scale(model(x).square().mean() * 100).backward()
            if model is b:  # how many units the loop's AGC clips (unscaled gradients)
                with_grad = [p for p in model.parameters() if p.grad is not None]
                clipped += sum(
                    not torch.equal(reference_agc(p, p.grad / 2.0**12).float(), p.grad / 2.0**12)
                    for p in with_grad
                )
            scaler.step(opt)
            scaler.update()
    assert clipped > 0  # the comparison exercises clipping
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_remove_detaches_and_keyword_closure_is_clipped() -> None:
    a, b = twin_models()
    x = torch.randn(2, 3, 4, 4)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    agc = attach_agc(opt_a, exclude=())
    assert attached(opt_a) == [agc]

    def closure() -> torch.Tensor:
        opt_a.zero_grad()
        loss = a(x).square().mean() * 100
        loss.backward()
        return loss

    opt_a.step(closure=closure)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    opt_b.zero_grad()
    (b(x).square().mean() * 100).backward()
    adaptive_clip_grad_(b.parameters())
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # detached: the next step uses the raw gradients
    agc.remove()
    assert attached(opt_a) == []
    opt_a.step(closure)
    opt_b.zero_grad()
    (b(x).square().mean() * 100).backward()
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


# --------------------------------------------------------------------------------------------
# Weight norms from the Scaled-WS forward (normfree.nn.ws.unit_norm_from_forward)
# --------------------------------------------------------------------------------------------
def _ws_net_after_backward(seed: int) -> nn.Module:
    from normfree.nn import ScaledStdConv2d

    torch.manual_seed(seed)
    net = nn.Sequential(ScaledStdConv2d(3, 8, 3, padding=1), nn.ReLU(),
                        ScaledStdConv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 3))  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))  # non-zero kernel means: ‖W‖ ≠ ‖W − μ‖
    net(torch.randn(5, 3, 6, 6)).square().sum().mul(1e3).backward()
    return net


def test_ws_forward_norms_give_the_same_clipping() -> None:
    from normfree.nn.ws import unit_norm_from_forward

    net = _ws_net_after_backward(3)
    convs = [p for p in net.parameters() if p.ndim == 4]
    for p in convs:  # the forward's statistics are there and equal the direct norm
        known = unit_norm_from_forward(p)
        assert known is not None
        torch.testing.assert_close(known, unitwise_norm(p).flatten(), rtol=2e-6, atol=0.0)
    before = {id(p): p.grad.clone() for p in net.parameters()}
    expected = {id(p): reference_agc(p, before[id(p)], 0.01) for p in net.parameters()}
    adaptive_clip_grad_(net.parameters(), clipping=0.01)
    clipped = 0
    for p in net.parameters():
        torch.testing.assert_close(p.grad.double(), expected[id(p)], rtol=1e-5, atol=0.0)
        clipped += int(not torch.equal(p.grad, before[id(p)]))
    assert clipped >= 2  # the conv gradients were clipped through the forward's norms


def test_ws_forward_norms_are_dropped_when_the_weight_changes() -> None:
    from normfree.nn.ws import unit_norm_from_forward

    net = _ws_net_after_backward(4)
    conv = next(p for p in net.parameters() if p.ndim == 4)
    with torch.no_grad():
        conv.mul_(3.0)  # after the forward: its statistics are stale
    assert unit_norm_from_forward(conv) is None
    g = conv.grad.clone()
    adaptive_clip_grad_([conv], clipping=0.01)
    torch.testing.assert_close(conv.grad.double(), reference_agc(conv, g, 0.01), rtol=1e-5,
                               atol=0.0)  # fmt: skip


def test_ws_forward_norms_from_every_kind_of_statistics() -> None:
    """The eager CPU forward keeps ``rsqrt(var)`` (group norm's statistics) or, for a weight
    with a floored unit, ``N·var`` (the separate passes); the accelerators' sync-free form
    (run here on the CPU) keeps ``var`` (of ``var_mean``), with or without autograd; every
    kind gives the direct per-unit norms."""
    from normfree.nn.unit_norms import remember_unit_stats, unit_norms_from_forward
    from normfree.nn.ws import scaled_standardize
    from normfree.nn.ws_functional import _device_standardize

    torch.manual_seed(5)
    plain = nn.Parameter(torch.randn(6, 3, 3, 3, dtype=torch.float64) + 0.4)
    floored = nn.Parameter(torch.randn(5, 2, 1, 1, dtype=torch.float64) - 0.2)
    device = nn.Parameter(torch.randn(7, 4, 3, 3, dtype=torch.float64) - 0.3)
    trained = nn.Parameter(torch.randn(3, 8, dtype=torch.float64) + 0.1)
    with torch.no_grad():
        floored[1] = 0.7  # a constant unit: N·var = 0 < eps
        scaled_standardize(plain)
        scaled_standardize(floored)
        _device_standardize(device, None, 1e-4, 1.0)
    _device_standardize(trained, None, 1e-4, 1.0).sum().backward()  # the autograd Function
    weights = [plain, floored, device, trained]
    for p, known in zip(weights, unit_norms_from_forward(weights)):
        assert known is not None
        torch.testing.assert_close(known, unitwise_norm(p).flatten(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="exactly one"):
        remember_unit_stats(plain, plain.mean((1, 2, 3)))
    with pytest.raises(ValueError, match="exactly one"):
        remember_unit_stats(plain, plain.mean((1, 2, 3)), var=plain, inv_std=plain)


def test_a_tied_weight_is_excluded_by_either_name() -> None:
    # named_parameters() lists a shared parameter once; its alias is a valid name all the same
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    net[1].weight = net[0].weight
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    agc = attach_agc(opt, exclude=["1.weight"], model=net)
    assert agc.excluded_names == ["1.weight"]
    assert agc.excluded_ids == frozenset({id(net[0].weight)})
    net(torch.randn(2, 3)).sum().mul(1e3).backward()
    grad = net[0].weight.grad.clone()
    agc.clip_grad_()  # the tied weight's large gradient is left alone
    torch.testing.assert_close(net[0].weight.grad, grad, rtol=0, atol=0)


def test_a_model_given_for_its_parameters_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"pass the model's parameters \(model.parameters\(\)\)"):
        adaptive_clip_grad_(nn.Linear(2, 2))


def test_the_classifier_left_unclipped_the_papers_way_or_the_official_codes() -> None:
    """False: the whole final layer (the paper, timm); "bias": only its weight, its bias
    clipped with the gains and biases (DeepMind experiment_nfnets.py); True: nothing."""
    from normfree.optim import unclipped_classifier

    assert unclipped_classifier(TinyNet()) == ["fc.weight", "fc.bias"]
    assert unclipped_classifier(TinyNet(), "bias") == ["fc.weight"]
    assert unclipped_classifier(TinyNet(), True) == []
    assert unclipped_classifier(PlainNet(), "bias") == []  # declares no classifier
    nfnet = normfree.create_model("nfnet_f0", depths=(1, 1, 1, 1), widths=(16, 16, 16, 16),
                                  group_size=8, num_classes=3)  # fmt: skip
    assert unclipped_classifier(nfnet, "bias") == ["head.fc.weight"]
    headless = normfree.create_model("nf_resnet_cifar20", num_classes=0)
    assert unclipped_classifier(headless) == []
    with pytest.raises(ValueError, match="clip_classifier must be False, True or 'bias'"):
        unclipped_classifier(nfnet, "weight")  # type: ignore[arg-type]
