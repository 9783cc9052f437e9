"""ScaledStdConv2d vs nn.Conv2d, measured side by side in one process.

For each shape (batch 8 by default) it times, interleaved round by round, a plain ``nn.Conv2d``,
``ScaledStdConv2d`` (analytic-backward standardization, inference cache) and, for reference, a
``ScaledStdConv2d`` whose standardization is the straightforward autograd formula with
``torch.var_mean``; both train (forward + backward, input gradient included) and eval
(``torch.no_grad`` forward). Where normfree's optional native CPU kernels build
(:mod:`normfree.nn.native`), a "native" train column times ``ScaledStdConv2d`` with them.
It prints the median time per step and the median of the per-round
ratios to the plain conv. A second, identical plain conv ("A/A") shows the noise floor.

    python benchmarks/bench_ws.py            # the four shapes of issue 2, batch 8
    python benchmarks/bench_ws.py --quick    # smaller run (batch 2, fewer rounds)
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
from torch import Tensor, nn

from interleaved import cpu_name, median_ratio, time_interleaved
from normfree.nn import ScaledStdConv2d, native_kernels

__all__ = ["SHAPES", "VarMeanScaledStdConv2d", "main"]

# (in, out, kernel, groups, spatial)
SHAPES: list[tuple[int, int, int, int, int]] = [
    (64, 64, 3, 1, 56),
    (256, 256, 3, 1, 14),
    (2048, 512, 1, 1, 7),
    (1536, 1536, 3, 12, 8),
]


class VarMeanScaledStdConv2d(ScaledStdConv2d):
    """Reference formulation: plain autograd through ``torch.var_mean`` (official formula)."""

    def standardize(self, weight: Tensor) -> Tensor:
        var, mean = torch.var_mean(weight, dim=(1, 2, 3), correction=0, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * weight[0].numel(), min=self.eps))
        return (weight - mean) * (scale * self.gain.view(-1, 1, 1, 1) * self.gamma)


def _train_step(module: nn.Module, x: Tensor, grad_out: Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad_out)

    return step


def _native_step(step: Callable[[], None]) -> Callable[[], None]:
    def native_step() -> None:
        with native_kernels(True):
            step()

    return native_step


def _eval_step(module: nn.Module, x: Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            module(x)

    return step


def bench_shape(
    shape: tuple[int, int, int, int, int], batch: int, rounds: int, inner: int, native: bool
) -> dict[str, dict[str, float]]:
    cin, cout, k, groups, hw = shape
    torch.manual_seed(0)
    modules = {
        "conv": nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups),
        "conv_b": nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups),  # A/A noise control
        "ws": ScaledStdConv2d(cin, cout, k, groups=groups),
        "ws_varmean": VarMeanScaledStdConv2d(cin, cout, k, groups=groups),
    }
    x = torch.randn(batch, cin, hw, hw, requires_grad=True)
    grad_out = torch.randn(batch, cout, hw, hw)
    steps: dict[str, Callable[[], None]] = {}
    for name, module in modules.items():
        steps[f"train/{name}"] = _train_step(module, x, grad_out)
    if native:
        native_ws = copy.deepcopy(modules["ws"])
        steps["train/ws_native"] = _native_step(_train_step(native_ws, x, grad_out))
    for name, module in modules.items():
        if name != "ws_varmean":  # same eval path as "ws" (cached weight)
            # A separate copy: a grad-enabled forward drops the inference cache, so sharing the
            # module with the interleaved train steps would recompute the weight every time.
            steps[f"eval/{name}"] = _eval_step(copy.deepcopy(module).eval(), x)
    times = time_interleaved(steps, rounds, inner)
    result: dict[str, dict[str, float]] = {}
    for key, values in times.items():
        mode = key.split("/")[0]
        result[key] = {
            "ms": statistics.median(values) * 1e3,
            "ratio": median_ratio(values, times[f"{mode}/conv"]),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 2, fewer rounds")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    batch = args.batch or (2 if args.quick else 8)
    rounds = args.rounds or (5 if args.quick else 15)
    inner = 1 if args.quick else 2
    if args.threads:
        torch.set_num_threads(args.threads)
    with native_kernels(True) as native:  # builds them once (~30 s) if this machine can
        pass
    print(
        f"torch {torch.__version__} | {cpu_name()} | "
        f"{torch.get_num_threads()} threads | batch {batch} | {rounds} rounds × {inner}"
    )
    header = (
        f"{'shape':<28} {'mode':<5} {'conv ms':>9} {'ws ms':>9} {'ws/conv':>8} "
        f"{'var_mean/conv':>14} {'native/conv':>12} {'A/A':>7}"
    )
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        cin, cout, k, groups, hw = shape
        label = f"{cin}->{cout} {k}x{k}" + (f" g{groups}" if groups > 1 else "") + f" @{hw}²"
        res = bench_shape(shape, batch, rounds, inner, native)
        for mode in ("train", "eval"):
            varmean, nat = res.get(f"{mode}/ws_varmean"), res.get(f"{mode}/ws_native")
            varmean_text = f"{varmean['ratio']:.3f}x" if varmean else "-"
            native_text = f"{nat['ratio']:.3f}x" if nat else "-"
            print(
                f"{label:<28} {mode:<5} {res[f'{mode}/conv']['ms']:>9.2f} "
                f"{res[f'{mode}/ws']['ms']:>9.2f} {res[f'{mode}/ws']['ratio']:>7.3f}x "
                f"{varmean_text:>14} {native_text:>12} {res[f'{mode}/conv_b']['ratio']:>6.3f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
