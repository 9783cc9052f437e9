"""Accelerator code paths checked without an accelerator.

On CUDA, eager Scaled WS runs the sync-free form (:class:`_ScaledStandardizeDevice`: batch
norm's kernels, the floor applied on the device). PyTorch's ``meta`` device takes the same
path and computes nothing, so what a train step dispatches there is what it launches on CUDA:
these tests count it exactly (every host read of a device value, which stalls a GPU step,
and the kernels per Scaled-WS conv). The numbers of the form are checked on the CPU, with the
CPU's eager form swapped for it, against the paper's plain form in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normfree
from dispatch_count import DispatchCount  # benchmarks/ (pytest's pythonpath)
from model_cases import TINY_NFNET, forward_backward, make_model
from normfree.nn import ScaledStdConv2d, plain_forward, ws_functional
from normfree.nn.unit_norms import unit_norms_from_forward
from normfree.optim import attach_agc, unitwise_norm


def test_scaled_ws_on_the_device_path_takes_twelve_kernels_and_no_host_read() -> None:
    """One Scaled-WS conv weight on the meta device: 5 operations forward (``var_mean``, the
    floor, the gains, batch norm's inference kernel, ``rsqrt``), 7 backward (batch norm's
    backward and the floored units' term), no host read. The analytic form it replaces took
    10 and 15 (measured before the change), and the CPU form reads the floor check on the host
    once per conv."""
    conv = ScaledStdConv2d(32, 64, 3).to("meta")
    with DispatchCount() as forward:
        w = ws_functional.scaled_standardize(conv.weight, conv.gain, conv.eps, 1.7)
    assert type(w.grad_fn).__name__ == "_ScaledStandardizeDeviceBackward"
    upstream = torch.ones_like(w)
    with DispatchCount() as backward:
        w.backward(upstream)
    assert forward.host_reads() == backward.host_reads() == 0
    assert sum(forward.counts.values()) == 5, forward.counts
    assert sum(backward.counts.values()) == 7, backward.counts
    assert forward.counts["native_batch_norm"] == backward.counts["native_batch_norm_backward"] == 1
    assert conv.weight.grad.shape == conv.weight.shape and conv.gain.grad.shape == (64,)


@pytest.mark.parametrize("name, budget", [("nf_resnet50", 1250), ("nfnet_f0", 1500)])
def test_a_train_step_on_the_device_path_reads_nothing_from_the_device(
    name: str, budget: int
) -> None:
    """A whole train step (forward, backward, AGC attached to SGD's foreach step, CUDA's
    default) of nf_resnet50 and nfnet_f0 on the meta device dispatches no host read, and at
    most ``budget`` operations (kernels on CUDA): 1143 and 1409 with torch 2.14, against
    1879 and 2197 before the sync-free Scaled WS, 252 for the no-norm ResNet-50 and 2124 and
    3225 for timm's ports (``benchmarks/bench_dispatch.py``)."""
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=10, drop_path_rate=0.0, drop_rate=0.0)
    model = model.to("meta")
    x = torch.randn(2, 3, 64, 64, device="meta")
    y = torch.randint(0, 10, (2,), device="meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    agc = attach_agc(opt, clipping=0.01, model=model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    with DispatchCount() as counter:
        step()
    ws = {id(m.weight) for m in model.modules() if isinstance(m, ScaledStdConv2d)}
    clipped = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in agc.excluded_ids]
    assert counter.host_reads() == 0, counter.counts
    assert counter.counts["native_batch_norm_backward"] == len(ws)
    # one norm per clipped gradient, and per clipped weight except the Scaled-WS ones, whose
    # norms the forward kept (‖W_o‖² = N·(var + μ²))
    norms = len(clipped) + sum(id(p) not in ws for p in clipped)
    assert counter.counts["linalg_vector_norm"] == norms
    assert sum(counter.counts.values()) <= budget, counter.counts.most_common(12)


@pytest.mark.parametrize(
    "name, kwargs", [("nf_resnet26", {}), ("nfnet_f0", TINY_NFNET), ("nf_regnet_b0", {})]
)
def test_the_device_form_in_a_whole_model_equals_the_plain_form(
    name: str, kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The models with the CPU's Scaled-WS form swapped for the accelerators' sync-free one
    (which then runs on the CPU, asserted by its kernel count): outputs, input gradient and
    every parameter's gradient equal the paper's plain form in float64 (1e-9), and AGC's
    weight norms, which that form keeps, equal the direct ones (1e-12)."""
    ref = make_model(name, **kwargs).double().train()
    fast = copy.deepcopy(ref)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    upstream = torch.randn(2, 10, dtype=torch.float64)
    with plain_forward(ref):
        out_r, gx_r, grads_r = forward_backward(ref, x, upstream)
    monkeypatch.setattr(ws_functional, "_eager_standardize", ws_functional._device_standardize)
    with DispatchCount() as ran:
        out_f, gx_f, grads_f = forward_backward(fast, x, upstream)
    convs = [m for m in fast.modules() if isinstance(m, ScaledStdConv2d)]
    assert ran.counts["native_batch_norm_backward"] == len(convs)
    assert ran.counts["native_group_norm"] == 0
    tol = {"rtol": 1e-9, "atol": 1e-12}
    torch.testing.assert_close(out_f, out_r, **tol)
    torch.testing.assert_close(gx_f, gx_r, **tol)
    assert grads_f.keys() == grads_r.keys() == dict(ref.named_parameters()).keys()
    for pname, g in grads_r.items():
        assert g.any(), pname
        torch.testing.assert_close(grads_f[pname], g, **tol, msg=lambda m, n=pname: f"{n}: {m}")
    weights = [m.weight for m in convs]
    for w, known in zip(weights, unit_norms_from_forward(weights)):
        assert known is not None
        torch.testing.assert_close(known, unitwise_norm(w).flatten(), rtol=1e-12, atol=1e-14)
