"""The memory-traffic bound of Scaled WS and AGC in a train step, measured on this machine.

A normalizer-free ResNet's train step differs from the no-norm floor's (the same convolutions,
nothing else; ``bench_train.py``) by work that scales with the *weights*, not the batch: per
step, Scaled WS (Brock et al. 2021a, eq. 2) reads every weight W and writes Ŵ in the forward
(2 weight-sized passes), its backward reads ∂L/∂Ŵ and W and writes ∂L/∂W (3), and AGC
(Brock et al. 2021b, eq. 3) reads ∂L/∂W once for the per-unit gradient norms (1): six passes
over the weights, which no kernel can avoid (the convolution needs Ŵ in memory, the optimizer
needs ∂L/∂W). At small batches the weights outweigh the activations, and these passes alone
set a lower bound on the step-time ratio to the floor.

This script times, interleaved round by round in one process:

* ``copy``: one ``copy_`` of every weight into a preallocated buffer (read + write), and
  ``read``: one ``sum`` of every weight: the machine's streaming bandwidth on these tensors;
* ``ws forward`` and ``ws forward+backward``: normfree's Scaled WS
  (:func:`normfree.nn.scaled_standardize`, the default eager CPU form) over the model's
  weights, forward alone and with the backward from a fixed upstream gradient (the backward
  is their difference);
* ``agc norms``: the per-unit gradient norms AGC computes (one reduction per weight);
* ``floor step``: the no-norm floor's train step from ``bench_train.py`` (needs torchvision).

``--native`` times the Scaled-WS passes with normfree's native kernels
(:mod:`normfree.nn.native`, built on first use) instead of the default eager form; their
backward also sums AGC's per-unit gradient norms while it writes the gradient, so AGC's pass
is then counted as done (0 ms).

It prints the bytes each pass must move, the bound (six weight passes at the better of the two
measured bandwidths) next to what the kernels take, and both as a ratio to the floor's step::

    python benchmarks/bench_traffic.py --threads 2 --malloc tuned    # nf_resnet50, b8 @128²
    python benchmarks/bench_traffic.py --model nfnet_f0 --no-floor
    python benchmarks/bench_traffic.py --threads 2 --malloc tuned --native
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
from collections.abc import Callable

import torch
from torch import Tensor

import normfree
from bench_train import MissingPeer, make_variant
from interleaved import cpu_name, time_interleaved
from normfree.nn import ScaledStdConv2d, native_kernels, scaled_standardize
from normfree.train.allocator import tune_malloc

__all__ = ["main", "weight_passes"]

# weight-sized passes each piece must make: read W + write Ŵ; read ∂L/∂Ŵ and W, write ∂L/∂W;
# read ∂L/∂W
PASSES = {"ws forward": 2, "ws backward": 3, "agc norms": 1}


def _ws_modules(model: torch.nn.Module) -> list[ScaledStdConv2d]:
    return [m for m in model.modules() if isinstance(m, ScaledStdConv2d)]


def weight_passes(
    model: torch.nn.Module, native: bool = False
) -> dict[str, Callable[[], object]]:
    """The timed pieces for ``model``'s Scaled-WS weights (module docstring), each a callable;
    ``native``: the Scaled-WS passes through the native kernels."""
    convs = _ws_modules(model)
    if not convs:
        raise ValueError("the model has no Scaled-WS convolutions")
    # parameters, as in a model: the forms keep their statistics (and the native backward its
    # gradient norms) for AGC as they do in a train step
    weights = [torch.nn.Parameter(c.weight.detach().clone()) for c in convs]
    gains = [c.gain.detach().clone().requires_grad_() for c in convs]
    upstream = [torch.randn_like(w) for w in weights]
    copies = [torch.empty_like(w) for w in weights]
    dims = [tuple(range(1, w.dim())) for w in weights]
    standardized: list[Tensor] = []

    def copy() -> None:
        for dst, w in zip(copies, weights):
            dst.copy_(w.detach())

    def read() -> object:
        return [w.detach().sum() for w in weights]

    def kernels() -> contextlib.AbstractContextManager:
        return native_kernels({"scaled_ws"}) if native else contextlib.nullcontext()

    def ws_forward() -> None:
        standardized.clear()
        with kernels():
            for conv, w, g in zip(convs, weights, gains):
                standardized.append(scaled_standardize(w, g, conv.eps, conv.gamma))

    def ws_forward_backward() -> None:
        ws_forward()
        with kernels():
            torch.autograd.backward(standardized, upstream)
        standardized.clear()
        for t in (*weights, *gains):
            t.grad = None

    def agc_norms() -> object:
        return [torch.linalg.vector_norm(g, 2, dim=d) for g, d in zip(upstream, dims)]

    return {
        "copy": copy,
        "read": read,
        "ws forward": ws_forward,
        "ws forward+backward": ws_forward_backward,
        "agc norms": agc_norms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nf_resnet50")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8, help="of the floor's step")
    parser.add_argument("--size", type=int, default=128, help="of the floor's step")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor's train step")
    parser.add_argument("--malloc", choices=("default", "tuned"), default="default")
    parser.add_argument("--native", action="store_true",
                        help="the Scaled-WS passes through normfree's native kernels")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = tune_malloc() if args.malloc == "tuned" else "malloc: as is"
    if args.native:
        with native_kernels({"scaled_ws"}) as built:  # build now, outside the timed rounds
            if not built:
                print("error: --native: the native kernels cannot be built here", file=sys.stderr)
                return 2
    try:
        model = normfree.create_model(args.model)
        pieces = weight_passes(model, native=args.native)
    except (KeyError, ValueError) as err:
        print(f"error: --model {args.model!r}: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    weights = [m.weight for m in _ws_modules(model)]
    size = sum(w.numel() * w.element_size() for w in weights)
    steps: dict[str, Callable[[], object]] = dict(pieces)
    if args.native:  # the native backward sums the gradient norms while writing the gradient
        del steps["agc norms"]
    floor = None
    if not args.no_floor:
        ns = argparse.Namespace(batch=args.batch, size=args.size, channels_last=False,
                                fused_optimizer=False, optimizer="sgd")  # fmt: skip
        try:
            floor = make_variant("torchvision:resnet50_nonorm", ns, torch.device("cpu"))
            steps["floor step"] = floor.train
        except MissingPeer as err:
            print(f"(no floor step: {err})")
    times = time_interleaved(steps, rounds=args.rounds, inner=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["ws backward"] = med.pop("ws forward+backward") - med["ws forward"]
    if args.native:
        med["agc norms"] = 0.0
    bandwidth = max(2 * size / med["copy"], size / med["read"])
    print(
        f"{datetime.date.today()} | torch {torch.__version__} | {cpu_name()} | "
        f"{torch.get_num_threads()} threads | {args.rounds} rounds | {malloc} | "
        f"Scaled WS: {'native kernels' if args.native else 'default eager form'}"
    )
    print(f"{args.model}: {len(weights)} Scaled-WS weights, {size / 2**20:.1f} MiB")
    print(f"copy {med['copy'] * 1e3:.2f} ms ({2 * size / med['copy'] / 1e9:.1f} GB/s), "
          f"read {med['read'] * 1e3:.2f} ms ({size / med['read'] / 1e9:.1f} GB/s)")  # fmt: skip
    print(f"{'pass':<12} {'passes':>6} {'bound ms':>9} {'kernel ms':>10}")
    total_bound = total_kernel = 0.0
    for name, passes in PASSES.items():
        bound = passes * size / bandwidth
        total_bound += bound
        total_kernel += med[name]
        print(f"{name:<12} {passes:>6} {bound * 1e3:>9.2f} {med[name] * 1e3:>10.2f}")
    print(f"{'total':<12} {sum(PASSES.values()):>6} {total_bound * 1e3:>9.2f} "
          f"{total_kernel * 1e3:>10.2f}")  # fmt: skip
    if "floor step" in med:
        step = med["floor step"]
        print(
            f"floor step (b{args.batch} @{args.size}²) {step * 1e3:.1f} ms: these passes alone "
            f"put a normalizer-free step at >= {1 + total_bound / step:.3f}x the floor "
            f"(bandwidth bound), {1 + total_kernel / step:.3f}x with these kernels"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
