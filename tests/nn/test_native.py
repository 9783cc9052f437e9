"""The optional native Scaled-WS kernels (normfree.nn.native): the same training step and the
same float32 numbers as the PyTorch-op path, the floor, the switch and its fallback when the
extension cannot be built. Their float64 equality with the analytic function (floor included,
with gradcheck) is tests/nn/test_ws.py::test_eager_cpu_function_equals_the_analytic_one."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import normfree
from normfree.nn import native
from normfree.nn.unit_norms import unit_grad_norms_from_backward
from normfree.nn.ws import ScaledStdConv2d, scaled_standardize, unit_norm_from_forward
from normfree.nn.ws_functional import _ScaledStandardize


def _weights(floored: bool, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3 + int(floored))
    w = torch.randn(6, 4, 3, 3, dtype=dtype, generator=gen) + 0.3
    if floored:  # one unit with N·var far below eps: the official floor is active there
        w[3] = 0.2 + 1e-6 * torch.randn(4, 3, 3, dtype=dtype, generator=gen)
    gain = torch.rand(6, dtype=dtype, generator=gen) + 0.5
    upstream = torch.randn(6, 4, 3, 3, dtype=dtype, generator=gen)
    return w.requires_grad_(), gain.requires_grad_(), upstream


def test_float32_and_odd_fan_ins_match_the_op_path(kernels) -> None:
    # fan-ins around the kernels' 8-lane blocks, a non-contiguous (channels_last) weight
    # (fan-ins ≥ 4 and a fixed seed: with 2–3 weights per unit the backward's projection
    # cancels almost all of s·δ and float32 rounding of either path dominates the result)
    gen = torch.Generator().manual_seed(7)
    for shape in [(5, 4, 1, 1), (7, 5, 1, 1), (16, 9, 1, 1), (33, 17, 3, 3), (64, 3, 7, 7)]:
        w = torch.randn(shape, generator=gen).mul_(0.2).add_(0.01)
        w = w.contiguous(memory_format=torch.channels_last)
        gain = torch.rand(shape[0], generator=gen) + 0.5
        up = torch.randn(shape, generator=gen)
        results = []
        for on in (True, False):
            with native.native_kernels(on):
                wr, gr = w.clone().requires_grad_(), gain.clone().requires_grad_()
                out = scaled_standardize(wr, gr, 1e-4, 1.3)
                results.append((out, *torch.autograd.grad(out, (wr, gr), up)))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("fan_in", [255, 256, 257, 520, 4611])
@pytest.mark.parametrize("units", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_of_several_blocks_match_the_analytic_function(
    native_on, fan_in, units, dtype
) -> None:
    # the kernels sweep a row's output in blocks of 256 weights, requesting the next row of the
    # thread's share meanwhile: fan-ins across block and 8-lane boundaries, units split over
    # two threads, against the float64 analytic function and a direct float64 gradient norm
    # (float32: its rounding); the backward without the norms writes the same gradient
    ext = native.extension("scaled_ws")
    gen = torch.Generator().manual_seed(fan_in + units)
    w = torch.randn(units, fan_in, dtype=torch.float64, generator=gen).mul_(0.1).add_(0.02)
    gain = torch.rand(units, dtype=torch.float64, generator=gen) + 0.5
    up = torch.randn(units, fan_in, dtype=torch.float64, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = (w.to(dtype), gain.to(dtype))
        out, mean, n_var = ext.scaled_ws_forward(*args, 1e-4, 1.3)
        grad_w, grad_gain, norms = ext.scaled_ws_backward(
            up.to(dtype), args[0], mean, n_var, args[1], 1e-4, 1.3, True, True, True
        )
        plain_w, _, _ = ext.scaled_ws_backward(
            up.to(dtype), args[0], mean, n_var, args[1], 1e-4, 1.3, True, False, False
        )
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(plain_w, grad_w)
    wr, gr = w.clone().requires_grad_(), gain.clone().requires_grad_()
    ref = _ScaledStandardize.apply(wr, gr, 1e-4, 1.3)
    ref_w, ref_gain = torch.autograd.grad(ref, (wr, gr), up)
    if dtype == torch.float64:
        tol = {"rtol": 1e-11, "atol": 1e-13}
    else:  # ~1e-7 relative per value; the backward's projection cancels most of s·δ
        tol = {"rtol": 2e-5, "atol": 2e-6}
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(grad_w.double(), ref_w, **tol)
    torch.testing.assert_close(grad_gain.double(), ref_gain, **tol)
    torch.testing.assert_close(norms.double(), ref_w.norm(dim=1), rtol=tol["rtol"], atol=0.0)


def test_fan_in_one_is_all_floor(native_on) -> None:
    # one weight per unit: N·var = 0, every unit floored, Ŵ = 0 and ∂L/∂W = 0 (float64, where
    # the rounding of the op path's cancelling terms, ~1e-14 at scale 130, is below atol)
    w = torch.randn(5, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    gain = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    out = scaled_standardize(w, gain, 1e-4, 1.3)
    assert torch.equal(out, torch.zeros_like(out))
    ref = _ScaledStandardize.apply(w, gain, 1e-4, 1.3)
    up = torch.randn(5, 1, 1, 1, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (w, gain), up),
                    torch.autograd.grad(ref, (w, gain), up)):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_training_step_matches_the_op_path(assert_step_matches_the_op_path) -> None:
    # NF-ResNet with folded scales: every WS conv (gains, α/γ scales, skip gains) in one step
    torch.manual_seed(0)
    model = normfree.create_model("nf_resnet_cifar20", num_classes=10).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skip_gain.gain"):
                p.fill_(0.3)  # non-zero, so every branch's gradients are exercised
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 9])
    assert_step_matches_the_op_path(model, x, y)


def test_an_nf_regnet_training_step_matches_the_op_path(assert_step_matches_the_op_path) -> None:
    # NF-RegNet: squeeze-excite in every block, with the Scaled-WS convs around it
    torch.manual_seed(0)
    model = normfree.create_model(
        "nf_regnet_b0", num_classes=10, drop_rate=0.0, drop_path_rate=0.0
    ).double()
    with torch.no_grad():
        model.get_classifier().weight.normal_(0.0, 0.1)  # zero at init: nothing would flow back
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_step_matches_the_op_path(model, x, torch.tensor([1, 7]))


def test_eval_and_agc_statistics_use_the_kernel(native_on) -> None:
    conv = ScaledStdConv2d(8, 16, 3).double()
    with torch.no_grad():
        a = conv.standardized_weight()
    ref = _ScaledStandardize.apply(conv.weight.detach(), conv.gain.detach(), conv.eps, 1.0)
    torch.testing.assert_close(a, ref, rtol=1e-13, atol=1e-14)
    conv(torch.randn(2, 8, 5, 5, dtype=torch.float64))  # a training forward leaves the stats
    norms = unit_norm_from_forward(conv.weight)
    direct = conv.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, direct, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# Gradient norms summed by the native backward, read by AGC
# --------------------------------------------------------------------------------------------
def _ws_net(seed: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(ScaledStdConv2d(3, 8, 3, padding=1), nn.ReLU(),
                        ScaledStdConv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 3))  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net.to(dtype)


def _loss(net: nn.Module, seed: int = 0) -> torch.Tensor:
    dtype = next(net.parameters()).dtype
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return net(x).square().sum().mul(1e3)


def _conv_weights(net: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in net.modules() if isinstance(m, ScaledStdConv2d)]


def _direct(p: torch.Tensor) -> torch.Tensor:
    return p.grad.detach().flatten(1).norm(dim=1)


def reference_agc(p: torch.Tensor, g: torch.Tensor, clipping: float) -> torch.Tensor:
    """AGC of one tensor in float64 from direct norms (Brock et al. 2021b, Eq. 3; units are
    rows, a ≤1-D tensor is one unit; the unit-by-unit reference and its own tests are in
    tests/optim/test_agc.py)."""
    units = p.shape[0] if p.ndim >= 2 else 1
    w, g = p.detach().double().reshape(units, -1), g.double().reshape(units, -1)
    max_norm = w.norm(dim=1, keepdim=True).clamp_min(1e-3) * clipping
    g_norm = g.norm(dim=1, keepdim=True)
    factor = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), 1.0)
    return (g * factor).reshape(p.shape)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_backward_keeps_the_gradient_norms(native_on, dtype, rtol) -> None:
    net = _ws_net(0, dtype)
    _loss(net).backward()
    weights = _conv_weights(net)
    norms = unit_grad_norms_from_backward(weights, [p.grad for p in weights])
    for p, n in zip(weights, norms):
        assert n is not None and n.dtype == dtype
        torch.testing.assert_close(n, _direct(p), rtol=rtol, atol=0.0)
    fc = net[-1].weight  # not a Scaled-WS weight: nothing kept
    assert unit_grad_norms_from_backward([fc], [fc.grad]) == [None]
    with native.native_kernels(False):  # the op path keeps none
        net.zero_grad()
        _loss(net).backward()
    assert unit_grad_norms_from_backward(weights, [p.grad for p in weights]) == [None, None]


def _stale_by_version(p: nn.Parameter) -> None:
    p.grad.mul_(2.0)


def _stale_by_middle_rows(p: nn.Parameter) -> None:  # the spot check cannot see this one
    p.grad[1:-1].mul_(2.0)


def _stale_by_another_forward(p: nn.Parameter) -> None:  # memory reuse: .grad may not be ours
    with native.native_kernels(False):
        scaled_standardize(p, None)


def _stale_by_data(p: nn.Parameter) -> None:
    p.grad.data.mul_(2.0)  # .data has its own version counter: the spot check catches it


def _stale_by_replacing(p: nn.Parameter) -> None:
    p.grad = p.grad * 2.0


def _stale_by_unscaling(p: nn.Parameter) -> None:  # GradScaler.unscale_'s kernel: no version bump
    found_inf, inv_scale = torch.zeros(1), torch.full((1,), 0.5)
    torch._amp_foreach_non_finite_check_and_unscale_([p.grad], found_inf, inv_scale)


def _stale_by_a_step(p: nn.Parameter) -> None:
    # middle rows changed through .data (no version bump, the spot check cannot see them), then
    # an optimizer step: norms from before a step are never read after it
    p.grad.data[1:-1].mul_(2.0)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).step()


@pytest.mark.parametrize(
    "change",
    [_stale_by_version, _stale_by_middle_rows, _stale_by_another_forward, _stale_by_data,
     _stale_by_replacing, _stale_by_unscaling, _stale_by_a_step],
)  # fmt: skip
def test_changed_gradients_are_not_read_from_the_backward(native_on, change) -> None:
    from normfree.optim.agc import adaptive_clip_grad_

    net = _ws_net(1)
    _loss(net).backward()
    weights = _conv_weights(net)
    change(weights[0])
    assert unit_grad_norms_from_backward(weights, [p.grad for p in weights])[0] is None
    before = [p.grad.clone() for p in weights]
    adaptive_clip_grad_(weights, clipping=0.01)
    for p, g in zip(weights, before):
        torch.testing.assert_close(p.grad.double(), reference_agc(p, g, 0.01), rtol=1e-5, atol=0)


def test_accumulated_and_shared_gradients_are_clipped_exactly(native_on) -> None:
    from normfree.optim.agc import adaptive_clip_grad_

    net = _ws_net(2)
    _loss(net, 0).backward()
    _loss(net, 1).backward()  # accumulated: .grad is the old tensor plus the new gradient
    weights = _conv_weights(net)
    assert unit_grad_norms_from_backward(weights, [p.grad for p in weights]) == [None, None]
    conv = ScaledStdConv2d(3, 3, 3, padding=1)  # one weight, two uses: autograd sums two grads
    conv(conv(torch.randn(2, 3, 5, 5))).square().sum().backward()
    for params in (weights, [conv.weight]):
        before = [p.grad.clone() for p in params]
        adaptive_clip_grad_(params, clipping=0.01)
        clipped = 0
        for p, g in zip(params, before):
            torch.testing.assert_close(p.grad.double(), reference_agc(p, g, 0.01), rtol=1e-5,
                                       atol=0)  # fmt: skip
            clipped += int(not torch.equal(p.grad, g))
        assert clipped >= 1


def test_agc_reads_the_backward_norms_and_clips_the_same(native_on) -> None:
    from normfree.optim import AGC

    for on in (True, False):
        with native.native_kernels(on):
            net = _ws_net(3, torch.float64)
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            AGC(opt, clipping=0.01, model=net, exclude=())
            _loss(net).backward()
            weights = _conv_weights(net)
            kept = unit_grad_norms_from_backward(weights, [p.grad for p in weights])
            assert all(n is not None for n in kept) is on
            before = {id(p): p.grad.clone() for p in net.parameters()}
            expected = {id(p): p.detach() - 0.1 * reference_agc(p, before[id(p)], 0.01)
                        for p in net.parameters()}  # fmt: skip
            opt.step()
            for p in net.parameters():
                torch.testing.assert_close(p.detach(), expected[id(p)], rtol=1e-12, atol=1e-14)
            assert any(not torch.equal(reference_agc(p, before[id(p)], 0.01), before[id(p)])
                       for p in weights)  # fmt: skip


def _on_op_path(out: torch.Tensor) -> bool:
    """Whether ``out`` came from the PyTorch-op form of Scaled WS (group norm's autograd node
    under the output's view), not from the native Function."""
    node = out.grad_fn
    while node is not None and type(node).__name__.startswith("View"):
        node = node.next_functions[0][0]
    return type(node).__name__ == "NativeGroupNormBackward0"


def test_switch_and_context_manager(kernels) -> None:
    before = native.native_kernels_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with native.native_kernels(not before):
            assert native.native_kernels_enabled() is (not before)
            raise RuntimeError("boom")
    assert native.native_kernels_enabled() is before  # restored on error
    with pytest.raises(TypeError, match="bool"):
        native.set_native_kernels("yes")  # type: ignore[arg-type]
    w, gain, _ = _weights(False)
    with native.native_kernels(False):
        out = scaled_standardize(w, gain, 1e-4, 1.0)
        assert _on_op_path(out)
    with native.native_kernels(True):
        half = scaled_standardize(w.detach().to(torch.bfloat16), None)  # other dtypes: op path
        assert half.dtype == torch.bfloat16


def test_each_kernel_pair_can_be_chosen_alone(kernels) -> None:
    from normfree.nn.activations import TanhGELU

    w, gain, _ = _weights(False, dtype=torch.float32)
    x = 3 * torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(5))
    with native.native_kernels(False):
        plain_gelu = TanhGELU()(x)
    with native.native_kernels(["tanh_gelu"]) as on:
        assert on and native.native_kernels_enabled("tanh_gelu")
        assert not native.native_kernels_enabled("scaled_ws")
        assert _on_op_path(scaled_standardize(w, gain, 1e-4, 1.0))
        assert native.extension("tanh_gelu") is not None and native.extension("scaled_ws") is None
        assert not torch.equal(TanhGELU()(x), plain_gelu)  # the kernel's rounding, not the ops'
    with native.native_kernels({"scaled_ws"}):
        assert not _on_op_path(scaled_standardize(w, gain, 1e-4, 1.0))
        assert torch.equal(TanhGELU()(x), plain_gelu)  # the op path, bit for bit
        assert native.native_kernels_enabled() and not native.native_kernels_enabled("tanh_gelu")
    with native.native_kernels([]) as on:
        assert not on and not native.native_kernels_enabled()
    with pytest.raises(TypeError, match="collection of kernel names"):
        native.set_native_kernels("tanh_gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown native kernels \\['gelu'\\]; choose from"):
        native.set_native_kernels(["gelu"])
    with pytest.raises(ValueError, match="unknown native kernel"):
        native.native_kernels_enabled("gelu")


def test_the_environment_names_the_kernels() -> None:
    assert native._from_environment(" 1 ") == set(native.KERNELS)
    assert native._from_environment("On") == set(native.KERNELS)
    assert native._from_environment("") == native._from_environment("off") == frozenset()
    assert native._from_environment("tanh_gelu") == {"tanh_gelu"}
    assert native._from_environment("scaled_ws, tanh_gelu") == set(native.KERNELS)
    assert native._from_environment("scaled_ws+tanh_gelu") == set(native.KERNELS)  # as bench_train
    with pytest.warns(RuntimeWarning, match="unknown native kernels \\['gelu'\\]"):
        assert native._from_environment("gelu,scaled_ws") == {"scaled_ws"}


def test_a_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.cpp_extension as cpp

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'normfree_native': g++ not found")

    monkeypatch.setattr(native, "_extension", None)
    monkeypatch.setattr(native, "_build_failed", False)
    monkeypatch.setattr(native, "_enabled", frozenset())
    monkeypatch.setattr(cpp, "load", fail)
    with pytest.warns(RuntimeWarning, match="g\\+\\+ not found.*PyTorch-op path"):
        assert native.set_native_kernels(True) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second build attempt
        assert native.set_native_kernels(True) is False
        assert native.native_kernels_enabled() is False
        w, gain, _ = _weights(False)
        out = scaled_standardize(w, gain, 1e-4, 1.0)
    assert _on_op_path(out)


def test_forward_mode_tangents_and_empty_weights_take_the_op_path(native_on) -> None:
    # the native functions detach their inputs: a dual weight keeps its tangent through the op
    # path; a weight without units standardizes to an empty tensor as on the op path
    from torch.autograd import forward_ad as fwad

    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    t = torch.randn_like(w)
    with fwad.dual_level():
        got = fwad.unpack_dual(scaled_standardize(fwad.make_dual(w, t), None, 1e-4, 1.0)).tangent
    with native.native_kernels(False), fwad.dual_level():
        want = fwad.unpack_dual(scaled_standardize(fwad.make_dual(w, t), None, 1e-4, 1.0)).tangent
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    empty = scaled_standardize(torch.randn(0, 3, 3, 3, dtype=torch.float64),
                               torch.ones(0, dtype=torch.float64))  # fmt: skip
    assert empty.shape == (0, 3, 3, 3)


def test_each_torch_version_builds_in_a_folder_of_its_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The extension's name (its build folder) depends on the torch version: a build from
    another torch is never loaded (PyTorch's cache key has no torch version), and the lock
    file a newer torch leaves is never waited on by an older one."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    names = {}
    for version in ("2.11.0+cu130", "2.14.1+cu130", "2.14.1+cpu"):
        monkeypatch.setattr(torch, "__version__", version)
        names[version] = native._extension_name()
    assert len(set(names.values())) == 3
    assert all(n.isidentifier() and n.startswith("normfree_native_") for n in names.values())
    loaded: list[str] = []
    monkeypatch.setattr(native, "_extension", None)
    monkeypatch.setattr(native, "_build_failed", False)
    monkeypatch.setattr(native, "_enabled", frozenset())
    monkeypatch.setattr(cpp, "load", lambda name, **kw: loaded.append((name, kw)))
    monkeypatch.setattr(native, "_operators", lambda name: object())
    assert native.set_native_kernels(True)
    name = names["2.14.1+cpu"]  # the running torch's (patched) version
    assert loaded == [(name, {**loaded[0][1], "build_directory": str(tmp_path / name)})]
    assert (tmp_path / name).is_dir()


@pytest.mark.parametrize("case", ["stale", "becomes_stale", "released"])
def test_a_stale_build_lock_is_removed_and_a_live_one_waited_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path, case: str
) -> None:
    """Torch releases that guard a build with a lock *file* (2.11) wait forever on one left by
    a killed build. normfree waits while a lock is younger than any build takes (another
    process building), then removes it with a warning; a lock its holder releases is not
    touched, and one that vanishes mid-check is no error."""
    import os
    import threading
    import time

    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "FileBaton", object, raising=False)  # the lock-file kind
    monkeypatch.setattr(native, "_STALE_LOCK_S", 2.0)
    lock = tmp_path / native._extension_name() / "lock"
    lock.parent.mkdir()
    lock.touch()
    age = {"stale": 3600.0, "becomes_stale": 1.0, "released": 0.0}[case]
    os.utime(lock, (time.time() - age,) * 2)
    if case == "released":  # the other process finishes its build after 0.5 s
        threading.Timer(0.5, lock.unlink).start()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native._build_directory() == lock.parent
    waited = time.perf_counter() - start
    assert not lock.exists()
    removed = any("stale build lock" in str(w.message) for w in caught)
    assert removed is (case != "released")
    assert {"stale": waited < 0.5, "becomes_stale": 0.5 < waited < 3.0,
            "released": 0.4 < waited < 3.0}[case]  # fmt: skip


@pytest.mark.parametrize("fan_in", [7, 256, 4611])
def test_bfloat16_output_and_gradient_are_the_casts_bits(native_on, fan_in) -> None:
    # under CPU autocast the forward writes a float32 weight's Ŵ as bfloat16 and the backward
    # reads the bfloat16 gradient: bit for bit Ŵ.to(bfloat16) (round to nearest even), the
    # float32 statistics, and the float32 backward of the widened gradient (fan-ins across the
    # 8-lane and 256-element blocks; a constant, floored row)
    ext = native.extension("scaled_ws")
    gen = torch.Generator().manual_seed(fan_in)
    w = torch.randn(9, fan_in, generator=gen).mul_(0.1).add_(0.02)
    w[4] = 0.3
    gain = torch.rand(9, generator=gen) + 0.5
    up = torch.randn(9, fan_in, generator=gen).bfloat16()
    out, mean, n_var = ext.scaled_ws_forward(w, gain, 1e-4, 1.3, True)
    ref, ref_mean, ref_n_var = ext.scaled_ws_forward(w, gain, 1e-4, 1.3)
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.float32
    assert torch.equal(out.view(torch.int16), ref.bfloat16().view(torch.int16))
    assert torch.equal(mean, ref_mean) and torch.equal(n_var, ref_n_var)
    got = ext.scaled_ws_backward(up, w, mean, n_var, gain, 1e-4, 1.3, True, True, True)
    want = ext.scaled_ws_backward(up.float(), w, mean, n_var, gain, 1e-4, 1.3, True, True, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].dtype == torch.float32 and float(got[0].abs().max()) > 0.0
    with pytest.raises(RuntimeError, match="a bfloat16 output needs float32 rows"):
        ext.scaled_ws_forward(w.double(), gain.double(), 1e-4, 1.3, True)
    with pytest.raises(RuntimeError, match="grad must have the weight's dtype"):
        ext.scaled_ws_backward(
            up, w.double(), mean.double(), n_var.double(), None, 1e-4, 1.3, True, False, False
        )


def test_the_entry_points_check_the_row_values_they_read(native_on) -> None:
    # the statistics and gain are read as plain arrays of one value per row: a strided view,
    # a short tensor, a 2-D gain or another dtype is refused, not read out of place or bounds;
    # the update kernels also refuse state that shares memory with the weight it updates
    ext = native.extension("scaled_ws")
    w = torch.randn(4, 9, dtype=torch.float64)
    gain = torch.rand(4, dtype=torch.float64) + 0.5
    up = torch.randn(4, 9, dtype=torch.float64)
    _, mean, n_var = ext.scaled_ws_forward(w, gain, 1e-4, 1.0)
    ok = ext.scaled_ws_backward(up, w, mean, n_var, gain, 1e-4, 1.0, True, True, False)
    assert ok[0].shape == w.shape
    strided = torch.stack([mean, mean], 1)[:, 0]  # the same values, stride 2
    assert torch.equal(strided, mean) and not strided.is_contiguous()
    bad = {
        "mean": (strided, n_var, gain),
        "n_var": (mean, n_var[:1], gain),
        "gain": (mean, n_var, gain.view(4, 1)),
    }
    for name, (m, v, g) in bad.items():
        with pytest.raises(RuntimeError, match=f"{name} must be a contiguous \\(out,\\) CPU"):
            ext.scaled_ws_backward(up, w, m, v, g, 1e-4, 1.0, True, True, False)
        with pytest.raises(RuntimeError, match=f"{name} must be a contiguous \\(out,\\) CPU"):
            ext.scaled_ws_backward_sgd(
                up, w.clone(), m, v, g, None, 1e-4, 1.0, True, 0.1, 0.0, 0.0, 0.0, False, False,
                0.0, 1e-3,
            )  # fmt: skip
    with pytest.raises(RuntimeError, match="gain must be a contiguous \\(out,\\) CPU"):
        ext.scaled_ws_forward(w, gain.float(), 1e-4, 1.0)
    weight = w.clone()
    overlap = "single memory location"
    with pytest.raises(RuntimeError, match=overlap):  # the buffer is the weight itself
        ext.scaled_ws_backward_sgd(
            up, weight, mean, n_var, gain, weight, 1e-4, 1.0, True, 0.1, 0.9, 0.0, 0.0, False,
            False, 0.0, 1e-3,
        )  # fmt: skip
    moments = torch.zeros(4, 9, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=overlap):  # both moments in one tensor
        ext.scaled_ws_backward_adam(
            up, weight, mean, n_var, gain, moments, moments, None, 1e-4, 1.0, True, 1e-3, 0.9,
            0.999, 1e-8, 0.0, False, False, 1e-2, 0.03, 0.0, 1e-3,
        )  # fmt: skip
    assert torch.equal(weight, w)  # nothing moved


@pytest.mark.parametrize("on", [True, False])
def test_an_autocast_training_step_hands_the_convs_bfloat16_weights(
    kernels, monkeypatch: pytest.MonkeyPatch, on: bool
) -> None:
    # a CPU autocast (bfloat16) training step: every Scaled-WS conv asks for its Ŵ in
    # bfloat16 (the native kernel writes it; the op path casts it), and the loss and every
    # parameter's gradient are bit for bit those of the float32 Ŵ that autocast casts itself
    import normfree.nn.ws as ws_module
    import normfree.nn.ws_functional as functional

    torch.manual_seed(0)
    model = normfree.create_model("nf_resnet_cifar20", num_classes=10, drop_path_rate=0.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 0:
                p.fill_(0.3)  # skip gains off zero: every branch carries a gradient
    convs = sum(isinstance(m, ScaledStdConv2d) for m in model.modules())
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 5, 9])
    direct = []
    native_standardize = functional._native_standardize

    def counting(*args, **kwargs):
        direct.append(args[-1] if len(args) == 6 else kwargs.get("bf16_out", False))
        return native_standardize(*args, **kwargs)

    monkeypatch.setattr(functional, "_native_standardize", counting)
    results = []
    for cast_by_autocast in (False, True):
        if cast_by_autocast:
            monkeypatch.setattr(ws_module, "cpu_autocast_dtype", lambda weight: None)
        model.zero_grad()
        with native.native_kernels(on), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    # with the kernels: one forward with bfloat16 output per conv, then one without
    assert direct == ([True] * convs + [False] * convs if on else [])
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(g.dtype == torch.float32 for g in grads_a)


def test_autocast_dtype_of_a_weight() -> None:
    from normfree.nn.eager_forms import cpu_autocast_dtype

    w = torch.zeros(2, 2)
    assert cpu_autocast_dtype(w) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_autocast_dtype(w) == torch.bfloat16
        assert cpu_autocast_dtype(w.double()) is None  # autocast casts float32 only
        assert cpu_autocast_dtype(w.bfloat16()) is None
        with torch.autocast("cpu", enabled=False):
            assert cpu_autocast_dtype(w) is None


def test_the_operators_declare_what_they_write(native_on) -> None:
    """The kernels are PyTorch operators (csrc/library.cpp) whose schemas mark the arguments
    they update in place (the weight and the optimizer's state): ``torch.library.opcheck``'s
    schema test runs each under PyTorch's schema checker, which fails an operator that writes
    an argument its schema does not mark as written (control: a Python operator that does)."""
    ops = native.extension("scaled_ws")
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(6, 27, dtype=torch.float64, generator=gen)
    gain = torch.rand(6, dtype=torch.float64, generator=gen) + 0.5
    _, mean, n_var = ops.scaled_ws_forward(w, gain, 1e-4, 1.0)
    dy, state = torch.randn_like(w), torch.rand_like(w) + 0.1
    cases = {
        "scaled_ws_forward": (w, gain, 1e-4, 1.0, False),
        "scaled_ws_backward": (dy, w, mean, n_var, gain, 1e-4, 1.0, True, True, True),
        "scaled_ws_backward_sgd": (dy, w.clone(), mean, n_var, gain, state.clone(), 1e-4, 1.0,
                                   True, 0.1, 0.9, 0.0, 1e-4, True, False, 0.01, 1e-3),
        "scaled_ws_backward_adam": (dy, w.clone(), mean, n_var, gain, state.clone(), state.clone(),
                                    state.clone(), 1e-4, 1.0, True, 0.1, 0.9, 0.999, 1e-8, 1e-2,
                                    True, False, 0.5, 0.3, 0.01, 1e-3),
        "tanh_gelu_forward": (torch.randn(10, generator=gen),),
        "tanh_gelu_backward": (torch.randn(10, generator=gen), torch.randn(10, generator=gen)),
    }  # fmt: skip
    assert set(cases) == set(native._OPERATORS)
    for name, args in cases.items():
        torch.library.opcheck(getattr(ops, name).default, args, test_utils=("test_schema",))

    lib = torch.library.Library("normfree_test_schema", "FRAGMENT")
    lib.define("scale(Tensor x) -> Tensor")
    lib.impl("scale", lambda x: x.mul_(2.0).clone(), "CPU")
    with pytest.raises(Exception, match="mutated"):
        torch.library.opcheck(torch.ops.normfree_test_schema.scale.default, (torch.ones(3),),
                              test_utils=("test_schema",))  # fmt: skip
