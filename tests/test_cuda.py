"""Device checks: every path that runs differently on an accelerator, held against the CPU.

On CUDA, Scaled WS takes its sync-free form (batch norm's kernels with the floor applied on
the device, not group norm's CPU kernel and its host-side floor check), 1×1 convs stay
``F.conv2d`` (no matrix forms), AGC clips every unit (no skip of the unclipped ones), fused
optimizers and ``GradScaler`` hand AGC a scale, and ``torch.compile`` generates Triton code.
Each test compares that path with an independent CPU reference: the paper's plain form in
float64, Eq. 3 of AGC written out, the eager step, the fp32 step.

They need a CUDA device (fixture ``accel``) and are skipped without one; run them on a GPU
machine with ``python3 -m pytest tests/test_cuda.py tests/train/test_cuda_train.py``.
``NORMFREE_TEST_ACCEL=cpu`` runs them on the CPU, to check the tests themselves.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import normfree
from model_cases import TINY_NFNET
from model_cases import forward_backward as _forward_backward
from model_cases import make_model as _model
from normfree.deploy import prepare_for_inference
from normfree.nn import plain_forward
from normfree.optim import AGC, unitwise_norm

# whole models whose fast paths differ between CPU and CUDA (Scaled WS, folded scales, SAME
# padding, squeeze-excite, Proxy Norm, grouped and depthwise convs)
MODELS = ["nf_resnet50", "nfnet_f0", "nf_regnet_b0", "lnpn_resnet50", "efficientnet_b0_g16_lnpn"]


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """float32 convs and matmuls in float32 (CUDA's default lets cuDNN use TF32, ~1e-3)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _batch(accel: torch.device, n: int, size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``n`` random images of ``size``² and labels of 10 classes, drawn after ``seed``."""
    torch.manual_seed(seed)
    x = torch.randn(n, 3, size, size, device=accel)
    return x, torch.randint(0, 10, (n,), device=accel)


@pytest.mark.parametrize("name", MODELS)
def test_model_on_accel_matches_the_plain_form_on_cpu_in_float64(
    name: str, accel: torch.device
) -> None:
    """Outputs, input gradient and every parameter's gradient of the default model on the
    accelerator equal the paper's plain form (every scale an op on the activations) on the
    CPU, in float64."""
    ref = _model(name).double().train()
    fast = copy.deepcopy(ref).to(accel)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    upstream = torch.randn(2, 10, dtype=torch.float64)
    with plain_forward(ref):
        out_r, gx_r, grads_r = _forward_backward(ref, x, upstream)
    out_f, gx_f, grads_f = _forward_backward(fast, x.to(accel), upstream.to(accel))
    tol = {"rtol": 1e-9, "atol": 1e-12}
    torch.testing.assert_close(out_f.cpu(), out_r, **tol)
    torch.testing.assert_close(gx_f.cpu(), gx_r, **tol)
    assert grads_f.keys() == grads_r.keys() == dict(ref.named_parameters()).keys()
    for pname, g in grads_r.items():
        torch.testing.assert_close(grads_f[pname].cpu(), g, **tol,
                                   msg=lambda m, n=pname: f"{n}: {m}")  # fmt: skip
    assert all(g.any() for g in grads_r.values())  # every parameter got a gradient


def test_eval_cache_and_inference_fold_on_accel_follow_fused_steps(
    accel: torch.device, exact_fp32: None
) -> None:
    """The eval-time cache of standardized weights is refreshed by a fused optimizer step taken
    between two evaluations (fused kernels do not bump ``param._version``), and the deployment
    fold gives the same outputs as a model rebuilt from the state_dict."""
    model = _model("nf_resnet26").to(accel)
    x, y = _batch(accel, 4, 64, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, fused=True)
    nn.functional.cross_entropy(model.train()(x), y).backward()
    with torch.no_grad():
        before = model.eval()(x)
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # served by the cache
        opt.step()
        after = model(x)
    rebuilt = _model("nf_resnet26").to(accel).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = rebuilt(x)
        folded = prepare_for_inference(copy.deepcopy(model))(x)
        on_cpu = copy.deepcopy(rebuilt).cpu()(x.cpu())
    assert (after - before).abs().max() > 1e-2  # the step moved the outputs
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(expected.cpu(), on_cpu, rtol=1e-4, atol=1e-4)


def _agc_reference(weight: torch.Tensor, grad: torch.Tensor, clipping: float, eps: float):
    """Eq. 3 of Brock et al. 2021b written out per unit (rows for ndim ≥ 2, the whole tensor
    otherwise), in float64 on the CPU."""
    w, g = weight.double().cpu(), grad.double().cpu()
    rows_w, rows_g = (w.flatten(1), g.flatten(1)) if w.ndim >= 2 else (w.reshape(1, -1),
                                                                        g.reshape(1, -1))
    max_norm = clipping * rows_w.norm(dim=1).clamp_min(eps)
    g_norm = rows_g.norm(dim=1)
    factor = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), 1.0)
    return (rows_g * factor[:, None]).reshape(g.shape), int((g_norm > max_norm).sum())


def test_agc_on_accel_matches_eq3(accel: torch.device) -> None:
    """AGC's batched clipping on the accelerator (every unit rescaled, none skipped) equals
    Eq. 3 per unit; the classifier is left alone; some units clip and some do not."""
    model = _model("nf_resnet26").double().to(accel)
    torch.manual_seed(3)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64, device=accel)
    model(x).square().sum().backward()
    head = {id(p) for p in model.get_classifier().parameters()}
    with torch.no_grad():  # scale the gradients so that about half of the units clip
        ratios = torch.cat([
            (unitwise_norm(p.grad) / unitwise_norm(p).clamp_min(1e-3)).flatten()
            for p in model.parameters() if id(p) not in head
        ])  # fmt: skip
        for p in model.parameters():
            p.grad.mul_(0.01 / ratios.median())
    expected, clipped, total = {}, 0, 0
    for name, p in model.named_parameters():
        if id(p) not in head:
            expected[name], n = _agc_reference(p.detach(), p.grad, 0.01, 1e-3)
            clipped += n
            total += p.shape[0] if p.ndim >= 2 else 1
    unclipped_head = {n: p.grad.clone() for n, p in model.named_parameters() if id(p) in head}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    AGC(opt, clipping=0.01, model=model).clip_grad_()
    assert 0 < clipped < total  # both branches of Eq. 3 are exercised
    for name, p in model.named_parameters():
        want = unclipped_head[name].cpu() if name in unclipped_head else expected[name]
        torch.testing.assert_close(p.grad.cpu(), want, rtol=1e-10, atol=1e-14,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def _fused_steps(accel: torch.device, scaler: torch.amp.GradScaler | None) -> list[torch.Tensor]:
    """Three steps of a fused SGD with AGC attached, under ``scaler`` if given, on a
    cross-entropy loss. Chosen so that the run-to-run noise of CUDA's convolution backward
    (atomics) stays at rounding level: SGD's update is linear in the gradient (Adam's
    normalisation turns the noise of near-zero gradients into ±lr; measured on an H200: two
    identical AdamW runs 2.8e-2 apart), and the unclipped classifier's gradient stays bounded
    (a squared-logit loss made it grow by 1e6 in three steps and the runs chaotic)."""
    model = _model("nf_resnet26").to(accel).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, fused=True)
    AGC(opt, clipping=0.01, model=model)
    for step in range(3):
        x, y = _batch(accel, 4, 64, seed=4 + step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return [p.detach().clone() for p in model.parameters()]


def test_agc_with_a_fused_optimizer_and_grad_scaler_on_accel_clips_unscaled_gradients(
    accel: torch.device, exact_fp32: None
) -> None:
    """A fused optimizer unscales inside its kernel and hands AGC the scale
    (``optimizer.grad_scale``): steps under a ``GradScaler`` (power-of-two scale, exact in
    float32) give the parameters of unscaled steps. Clipping the still-scaled gradients at
    the unscaled thresholds would clip every unit (4096× too large)."""
    plain = _fused_steps(accel, None)
    scaled = _fused_steps(accel, torch.amp.GradScaler(accel.type, init_scale=2.0**12))
    start = [p.detach() for p in _model("nf_resnet26").parameters()]
    moved = max((a.cpu() - s).abs().max().item() for a, s in zip(plain, start))
    assert moved > 1e-3
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["nf_resnet_cifar20", "nfnet_f0"])
def test_compiled_train_step_on_accel_matches_eager_without_graph_breaks(
    name: str, accel: torch.device, exact_fp32: None
) -> None:
    """``torch.compile(fullgraph=True)`` (one graph: the Scaled-WS Function, the weight cache
    and SAME padding trace) with normfree's compile options gives eager's loss and
    gradients."""
    kwargs = TINY_NFNET if name == "nfnet_f0" else {}
    model = _model(name, **kwargs).to(accel).train()
    compiled = torch.compile(
        model, fullgraph=True, options=normfree.nn.compile_options(accel) or None
    )
    x, y = _batch(accel, 4, 32, seed=5)
    results = []
    for fwd in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(fwd(x), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for pname, g in grads_e.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(grads_c[pname], g, rtol=1e-3, atol=1e-4 * scale + 1e-9,
                                   msg=lambda m, n=pname: f"{n}: {m}")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_train_step_on_accel_tracks_fp32(accel: torch.device, dtype) -> None:
    """Under autocast the standardization runs in float32 and the model's gradients stay
    within low-precision rounding of the fp32 step's (relative error of the whole gradient
    vector < 3 %, loss within 1 %); parameters and gradients stay float32."""
    if accel.type == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast is bf16")
    model = _model("nfnet_f0", **TINY_NFNET).to(accel).train()
    x, y = _batch(accel, 8, 64, seed=6)
    flat = []
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast(accel.type, dtype=dtype, enabled=amp):
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        assert out.dtype == (dtype if amp else torch.float32)
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        flat.append((loss.float().item(), grads))
    (loss32, g32), (loss16, g16) = flat
    assert abs(loss16 - loss32) < 1e-2 * abs(loss32)
    assert ((g16 - g32).norm() / g32.norm()).item() < 3e-2
