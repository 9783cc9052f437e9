"""``max_pool2d_same``: TF/JAX "SAME" max-pooling through PyTorch's padding + ``ceil_mode``
where that expresses the amounts, equal to pooling an explicitly ``-inf``-padded input."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

import normfree.nn.pooling as pooling
from compile_backends import direct_export, graphs_seen
from normfree.nn.padding import _pad_same_2d
from normfree.nn.pooling import MaxPoolSame, max_pool2d_same


def reference(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    return F.max_pool2d(_pad_same_2d(x, (k, k), (s, s), (1, 1), value=float("-inf")), k, s)


@pytest.mark.parametrize("k,s", [(1, 1), (2, 2), (3, 1), (3, 2), (3, 3), (5, 2)])
def test_values_and_gradients_equal_the_padded_reference(k: int, s: int) -> None:
    gen = torch.Generator().manual_seed(k * 10 + s)
    for h, w in itertools.product(range(1, 10), range(1, 10)):
        x = torch.randn(2, 3, h, w, dtype=torch.float64, generator=gen, requires_grad=True)
        expected, got = reference(x, k, s), max_pool2d_same(x, k, s)
        assert got.shape == expected.shape == (2, 3, -(-h // s), -(-w // s))
        assert torch.equal(got, expected)
        g = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
        (a,) = torch.autograd.grad(expected, x, g)
        (b,) = torch.autograd.grad(got, x, g)
        assert torch.equal(a, b)


def test_resnet_stem_pool_pads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pad(*args: object, **kwargs: object) -> None:
        raise AssertionError("the ResNet stem pool should not build a padded copy")

    x = torch.randn(2, 4, 64, 64)
    expected = reference(x, 3, 2)
    monkeypatch.setattr(pooling, "_pad_same_2d", no_pad)
    for size in (64, 65, 33):  # even (pad after only) and odd (pad both sides) inputs
        y = torch.randn(2, 4, size, size)
        assert MaxPoolSame()(y).shape[-1] == -(-size // 2)
    assert torch.equal(MaxPoolSame()(x), expected)


def test_traces_as_one_fx_leaf() -> None:
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(MaxPoolSame()))
    x = torch.randn(1, 2, 10, 10)
    assert torch.equal(gm(x), reference(x, 3, 2))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("size", [9, 10])
def test_jit_trace_gives_the_padded_reference(size: int) -> None:
    """Under ``torch.jit.trace`` the sizes are tensors, which ``ceil_mode`` cannot take: the
    trace used to fail with "argument 'ceil_mode' must be bool, not Tensor". (A trace keeps
    the padding of the size it was traced at, as PyTorch's TracerWarning says.)"""
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    traced = torch.jit.trace(MaxPoolSame(), (x,), check_trace=False)
    assert torch.equal(traced(x), reference(x, 3, 2))


# --- the channels-last CPU form (max_pool2d) against PyTorch's plain NCHW pool ---------------

POOLS = [(3, 2, (0, 0), True), (3, 2, (1, 1), False), (2, 2, (0, 0), False), (3, 1, (1, 0), False)]


def _tied(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """ReLU'd values rounded to halves: most windows hold ties (zeros above all), where the
    two kernels must still pick the same (first) maximum."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).relu().mul(2).round().div(2)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k,s,padding,ceil_mode", POOLS)
def test_channels_last_form_is_bit_identical_to_the_plain_pool(
    dtype: torch.dtype, k: int, s: int, padding: tuple[int, int], ceil_mode: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    taken = []
    apply = pooling._ChannelsLastMaxPool.apply
    monkeypatch.setattr(
        pooling._ChannelsLastMaxPool, "apply", lambda *a: taken.append(1) or apply(*a)
    )
    for seed, (h, w) in enumerate([(17, 15), (64, 64), (9, 10)]):
        x = _tied((3, 6, h, w), dtype, seed)
        x[0, 1, 2, 3] = float("nan")  # a NaN wins its windows in both kernels
        expected = F.max_pool2d(x, k, s, padding, ceil_mode=ceil_mode)
        with torch.no_grad():
            got = pooling.max_pool2d(x, k, s, padding, ceil_mode)
        assert got.is_contiguous() and torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())

        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = F.max_pool2d(xa, k, s, padding, ceil_mode=ceil_mode)
        yb = pooling.max_pool2d(xb, k, s, padding, ceil_mode)
        g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        ya.backward(g)
        yb.backward(g)
        assert torch.equal(yb.nan_to_num(), ya.nan_to_num())
        assert torch.equal(xb.grad, xa.grad)  # the same argmax everywhere, ties included
    assert len(taken) == 3  # the Function ran: this test compares the fast form


def test_channels_last_form_double_backward() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: pooling.max_pool2d(t, 3, 2, (1, 1)), (x,))


def test_other_inputs_take_the_plain_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_function(*args: object) -> None:
        raise AssertionError("the channels-last Function must not run here")

    monkeypatch.setattr(pooling._ChannelsLastMaxPool, "apply", no_function)
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    expected = F.max_pool2d(x, 3, 2, (1, 1))
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.equal(pooling.max_pool2d(cl, 3, 2, (1, 1)), expected)  # already channels-last
    batched = torch.func.vmap(lambda t: pooling.max_pool2d(t, 3, 2, (1, 1)))(x.unsqueeze(0))
    assert torch.equal(batched[0], expected)  # torch.func: no vmap rule in the Function
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        tangent = torch.ones_like(x)
        out = pooling.max_pool2d(fwAD.make_dual(x.detach(), tangent), 3, 2, (1, 1))
        assert torch.equal(fwAD.unpack_dual(out).tangent, torch.ones_like(expected))


@pytest.mark.parametrize("k,s,padding,ceil_mode", POOLS)
def test_compiled_pool_is_the_channels_last_operator_bit_identical_to_the_plain_pool(
    k: int, s: int, padding: tuple[int, int], ceil_mode: bool
) -> None:
    """Under torch.compile the pool is ``normfree::max_pool2d_channels_last`` (every captured
    graph holds it and no plain pool), with the plain pool's outputs and gradients to the bit,
    ties included, through its autograd registration and under AOTAutograd; a second input
    size recompiles with symbolic sizes (the fake kernel's shapes)."""
    torch._dynamo.reset()
    seen: list[str] = []

    def pool(t: torch.Tensor) -> torch.Tensor:
        return pooling.max_pool2d(t, k, s, padding, ceil_mode)

    recorded = torch.compile(pool, backend=graphs_seen(seen), fullgraph=True)
    aot = torch.compile(pool, backend="aot_eager", fullgraph=True)  # fake kernel, autograd
    for seed, (h, w) in enumerate([(17, 15), (12, 10), (9, 10)]):
        x = _tied((3, 6, h, w), torch.float32, seed)
        g = torch.randn(F.max_pool2d(x, k, s, padding, ceil_mode=ceil_mode).shape,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
        results = []
        for fn in (functools.partial(F.max_pool2d, kernel_size=k, stride=s, padding=padding,
                                     ceil_mode=ceil_mode), recorded, aot):  # fmt: skip
            xi = x.clone().requires_grad_()
            y = fn(xi)
            y.backward(g)
            with torch.no_grad():  # compiled evaluation takes the operator too
                results.append((y.is_contiguous(), y, xi.grad, fn(x)))
        for got in results[1:]:
            assert got[0] and all(torch.equal(a, b) for a, b in zip(got[1:], results[0][1:]))
    assert len(seen) >= 2 and all("ops.normfree.max_pool2d_channels_last" in c for c in seen)
    assert all("max_pool2d(" not in c for c in seen)  # the operator, no plain pool


def test_pool_operator_passes_torch_library_opcheck() -> None:
    """The schema, fake kernel, autograd registration and AOT dispatch of the operator agree
    with its eager kernel (``torch.library.opcheck``)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 11, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    for k, s, padding, ceil_mode in POOLS:
        torch.library.opcheck(
            torch.ops.normfree.max_pool2d_channels_last.default,
            (x, k, s, list(padding), ceil_mode),
        )


def test_export_and_channels_last_inputs_take_the_plain_pool_when_compiled() -> None:
    torch._dynamo.reset()
    seen: list[str] = []
    fn = torch.compile(
        lambda t: pooling.max_pool2d(t, 3, 2, (1, 1)), backend=graphs_seen(seen), fullgraph=True
    )
    cl = torch.randn(2, 4, 12, 12).contiguous(memory_format=torch.channels_last)
    assert torch.equal(fn(cl), F.max_pool2d(cl, 3, 2, 1))
    assert seen and "normfree" not in seen[0]
    with direct_export():
        program = torch.export.export(MaxPoolSame(), (torch.randn(2, 4, 12, 12),))
    assert "normfree" not in str(program.graph)  # an exported program holds only ATen ops


def test_the_same_pool_exports_with_a_free_even_size() -> None:
    """Under torch.export the "SAME" amounts of a symbolic size are symbolic, and ``ceil_mode``
    was then a SymBool that ``F.max_pool2d`` refused (TypeError): nf_resnet50 could not be
    exported with a free height and width."""
    pool = MaxPoolSame(3, 2)
    h, w = torch.export.Dim("h", min=2, max=64), torch.export.Dim("w", min=2, max=64)
    program = torch.export.export(
        pool, (torch.randn(2, 2, 8, 12),), dynamic_shapes=({2: 2 * h, 3: 2 * w},)
    ).module()
    for size in [(6, 10), (16, 4)]:
        x = torch.randn(2, 2, *size)
        torch.testing.assert_close(program(x), pool(x), rtol=0, atol=0)
