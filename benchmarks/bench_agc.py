"""Benchmark: normfree's vectorised AGC vs the per-parameter Python loop (timm style).

The parameter lists are built synthetically from the architecture descriptions (Brock et al.
2021a/b; DeepMind ``nfnets/nf_resnet.py`` and ``nfnet.py``) in PyTorch layouts: NF-ResNet-50
(25.56M parameters, 177 tensors) and NFNet-F0 (71.49M, 233 tensors). Every WS conv has a
(O, I/groups, kh, kw) weight, a (O,) gain and a (O,) bias; every block has a scalar skip gain;
NFNet blocks have SE 1×1 convs (with bias). Gradients are drawn so that the chosen fraction of
units is clipped at λ = 0.01 and are restored (untimed) before every timed call.

Run: ``python benchmarks/bench_agc.py [--device cuda] [--repeats 20] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from normfree.optim import adaptive_clip_grad_

Shape = tuple[int, ...]


def nf_resnet50_shapes() -> list[Shape]:
    shapes: list[Shape] = []

    def ws_conv(cin: int, cout: int, k: int) -> None:
        shapes.extend([(cout, cin, k, k), (cout,), (cout,)])

    ws_conv(3, 64, 7)
    cin = 64
    for mid, depth in zip([64, 128, 256, 512], [3, 4, 6, 3]):
        out = 4 * mid
        for b in range(depth):
            if b == 0:
                ws_conv(cin, out, 1)  # projection shortcut
            ws_conv(cin, mid, 1)
            ws_conv(mid, mid, 3)
            ws_conv(mid, out, 1)
            shapes.append(())  # skip gain
            cin = out
    shapes.extend([(1000, 2048), (1000,)])
    return shapes


def nfnet_f0_shapes() -> list[Shape]:
    shapes: list[Shape] = []

    def ws_conv(cin: int, cout: int, k: int, groups: int = 1) -> None:
        shapes.extend([(cout, cin // groups, k, k), (cout,), (cout,)])

    for cin, cout in [(3, 16), (16, 32), (32, 64), (64, 128)]:
        ws_conv(cin, cout, 3)  # stem
    cin = 128
    for out, depth in zip([256, 512, 1536, 1536], [1, 2, 6, 3]):
        mid = 128 * (int(out * 0.5) // 128)
        groups = mid // 128
        for b in range(depth):
            if b == 0:
                ws_conv(cin, out, 1)  # shortcut conv
            ws_conv(cin, mid, 1)
            ws_conv(mid, mid, 3, groups)
            ws_conv(mid, mid, 3, groups)  # conv1b
            ws_conv(mid, out, 1)
            hidden = int(out * 0.5)
            shapes.extend([(hidden, out, 1, 1), (hidden,), (out, hidden, 1, 1), (out,)])  # SE
            shapes.append(())  # skip gain
            cin = out
    ws_conv(1536, 3072, 1)  # final conv
    shapes.extend([(1000, 3072), (1000,)])
    return shapes


def make_params(
    shapes: list[Shape], clipped_fraction: float, device: torch.device, seed: int = 0
) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """Parameters with N(0, 0.05²) weights and gradients whose unit norm is 0.02·‖W_i‖ (clipped
    at λ = 0.01) for ``clipped_fraction`` of the units and 0.005·‖W_i‖ for the rest."""
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for shape in shapes:
        w = torch.randn(shape, generator=gen) * 0.05
        units = shape[0] if len(shape) >= 2 else 1
        ratio = torch.where(torch.rand(units, generator=gen) < clipped_fraction, 0.02, 0.005)
        g = torch.randn(shape, generator=gen)
        if len(shape) >= 2:
            dims = tuple(range(1, len(shape)))
            norm = torch.linalg.vector_norm
            scale = ratio * norm(w, dim=dims) / norm(g, dim=dims)
            g = g * scale.view((-1,) + (1,) * (len(shape) - 1))
        else:
            g = g * (ratio[0] * w.norm() / g.norm())
        p = torch.nn.Parameter(w.to(device))
        grads.append(g.to(device))
        params.append(p)
    return params, grads


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    if x.ndim <= 1:
        return x.norm(2.0)
    return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def agc_per_parameter_loop(
    params: list[torch.nn.Parameter], clipping: float = 0.01, eps: float = 1e-3
) -> None:
    """The per-parameter loop of timm's ``adaptive_clip_grad`` (rewritten here)."""
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.detach()
        max_norm = _unitwise_norm(p.detach()).clamp_(min=eps).mul_(clipping)
        grad_norm = _unitwise_norm(g)
        clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(grad_norm < max_norm, g, clipped))


def _time_interleaved(
    fns: list[Callable[[], None]], reset: Callable[[], None], device: torch.device, repeats: int
) -> list[tuple[float, float]]:
    """(min, median) milliseconds of each function; the functions alternate within every round
    so that background load hits them alike. Two warm-up rounds are not counted."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats + 2):
        for fn, acc in zip(fns, times):
            reset()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= 2:
                acc.append(time.perf_counter() - start)
    return [(min(t) * 1e3, statistics.median(t) * 1e3) for t in times]


def run_case(
    model: str, shapes: list[Shape], fraction: float, device: torch.device, repeats: int
) -> None:
    """Time both implementations on one parameter list and print one table row."""
    params, grads = make_params(shapes, fraction, device)
    for p in params:
        p.grad = torch.empty_like(p)

    def reset() -> None:
        torch._foreach_copy_([p.grad for p in params], grads)

    reset()
    agc_per_parameter_loop(params)
    expected = [p.grad.clone() for p in params]
    reset()
    adaptive_clip_grad_(params)
    diff = max((p.grad - e).abs().max().item() for p, e in zip(params, expected))
    del expected
    (loop_min, loop_med), (agc_min, agc_med) = _time_interleaved(
        [lambda: agc_per_parameter_loop(params), lambda: adaptive_clip_grad_(params)],
        reset,
        device,
        repeats,
    )
    n = sum(math.prod(s) for s in shapes) / 1e6
    print(
        f"{model:<12} {fraction:>7.0%} {len(shapes):>7} {n:>6.2f}M "
        f"{loop_min:>8.2f} {agc_min:>8.2f} {loop_min / agc_min:>6.2f}x "
        f"{loop_med / agc_med:>7.2f}x {diff:>10.2e}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    header = (
        f"{'model':<12} {'clipped':>7} {'tensors':>7} {'params':>7} "
        f"{'loop ms':>8} {'agc ms':>8} {'ratio':>7} {'(median)':>8} {'max |diff|':>10}"
    )
    print(header)
    for model, shapes in [("nf_resnet50", nf_resnet50_shapes()), ("nfnet_f0", nfnet_f0_shapes())]:
        for fraction in (0.5, 0.0, 1.0):
            run_case(model, shapes, fraction, device, args.repeats)


if __name__ == "__main__":
    main()
