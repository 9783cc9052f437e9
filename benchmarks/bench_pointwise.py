"""Every form of every pass of the 1×1 convolutions, timed inside a model's training steps.

normfree computes each pass of a stride-1 1×1 convolution on eager CPU (forward, ∂L/∂x, ∂L/∂W)
in the form its rules pick (:func:`normfree.nn.pointwise_kernels.rule_forms`): per-sample
products, one GEMM over the batch's pixels, or oneDNN's convolution. The rules' constants come
from one machine. This benchmark checks them on another: it runs warm train steps of a normfree
model (forward, cross-entropy, backward; no optimizer step, so every step sees the same
weights) with every 1×1 pass forced into one form, cycling through the combinations step by
step, and times each pass with ``perf_counter`` around it. A layer's time in isolation is not
its time inside the model (caches, the allocator), hence the whole steps.

It prints, per layer shape (times summed over the layers of that shape, ms per step; the median
of the faster half of the steps), each form of each pass, and the per-step totals of three
choices: the rules', the convolution everywhere, and the best form of each pass. Where the
rules' total is well above the best one on your machine, the matrix forms can be switched off
(``normfree.nn.set_pointwise_matmul(False)`` or ``NORMFREE_POINTWISE_MATMUL=0``).

    python benchmarks/bench_pointwise.py --threads 2                  # nf_resnet50, b8 @128²
    python benchmarks/bench_pointwise.py --threads 2 --model nfnet_f0 --steps 18

Denormals are flushed to zero, as in ``bench_train.py``: with a zero-initialised skip gain and a
tiny learning rate the gradients inside the branches are denormal, and without the flush the
passes that multiply them (the matrix forms above all) measure up to 30 % slower than they do
in real training.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import itertools
import statistics
import sys
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn

import normfree
from interleaved import cpu_name
from normfree.nn import pointwise_kernels as kernels

__all__ = ["FORMS", "main"]

# the forms of each pass (normfree.nn.pointwise_kernels.PassForms), in the order printed
FORMS: dict[str, tuple[str, ...]] = {
    "forward": ("product", "conv"),
    "input_grad": ("product", "conv"),
    "weight_grad": ("pixels", "samples", "conv"),
}
Key = tuple[tuple[int, int, int, int], str, str]  # ((in, out, H, W), pass, form)


@contextlib.contextmanager
def forced_forms(
    chosen: dict[str, str], times: dict[Key, float]
) -> Iterator[None]:
    """Within the block, every 1×1 pass of the eager training forms runs in ``chosen[pass]``
    and its wall time is added to ``times[(shape, pass, form)]``: the kernels' own
    ``pointwise_forward``/``pointwise_backward`` run, with ``rule_forms`` answering ``chosen``
    and each pass function timed (they are looked up in the module at call time)."""
    names = ("rule_forms", "forward_in", "input_grad_in", "weight_grad_in")
    originals = {name: getattr(kernels, name) for name in names}

    def timed(name: str, fn, key_shape) -> object:
        def run(form: str, *args: object) -> Tensor:
            start = time.perf_counter()
            result = fn(form, *args)
            times[(key_shape(*args), name, form)] += time.perf_counter() - start
            return result

        return run

    forms = kernels.PassForms(**chosen)
    kernels.rule_forms = lambda weight, area: forms
    kernels.forward_in = timed(  # (x, weight, bias)
        "forward", originals["forward_in"], lambda x, w, b: (x.shape[1], w.shape[0], *x.shape[2:])
    )
    kernels.input_grad_in = timed(  # (grad, x_shape, weight)
        "input_grad", originals["input_grad_in"],
        lambda g, shape, w: (shape[1], w.shape[0], *shape[2:]),
    )  # fmt: skip
    kernels.weight_grad_in = timed(  # (grad, x, weight)
        "weight_grad", originals["weight_grad_in"],
        lambda g, x, w: (x.shape[1], w.shape[0], *x.shape[2:]),
    )  # fmt: skip
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)


def _faster_half_median(values: list[float]) -> float:
    ordered = sorted(values)
    return statistics.median(ordered[: len(ordered) // 2 + 1])


def measure(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> dict[Key, float]:
    """ms per step of every (shape, pass, form), from ``steps`` timed train steps after one
    warm-up cycle through all combinations."""
    combos = list(itertools.product(*FORMS.values()))
    loss_fn = nn.CrossEntropyLoss()
    samples: dict[Key, list[float]] = collections.defaultdict(list)
    model.train()
    for step in range(len(combos) + steps):
        chosen = dict(zip(FORMS, combos[step % len(combos)]))
        times: dict[Key, float] = collections.defaultdict(float)
        model.zero_grad(set_to_none=True)
        with forced_forms(chosen, times):
            loss_fn(model(x), y).backward()
        if step >= len(combos):
            for key, seconds in times.items():
                samples[key].append(seconds)
    return {key: _faster_half_median(values) * 1e3 for key, values in samples.items()}


def report(result: dict[Key, float]) -> None:
    shapes = sorted({key[0] for key in result}, key=lambda s: (-s[2] * s[3], s[0], s[1]))
    heads = ["in→out @H×W"] + [f"{name} " + "/".join(forms) for name, forms in FORMS.items()]
    print(f"{heads[0]:22s} {heads[1]:>18s} {heads[2]:>18s} {heads[3]:>26s}   rule")
    totals = collections.Counter()
    for s in shapes:
        channels, out, height, width = s
        rule = kernels.rule_forms(torch.empty(out, channels, 1, 1), height * width)
        cells = []
        for name, forms in FORMS.items():
            values = [result.get((s, name, form), float("nan")) for form in forms]
            cells.append("/".join(f"{v:.2f}" for v in values))
            totals["rule"] += result.get((s, name, getattr(rule, name)), float("nan"))
            totals["conv"] += result.get((s, name, "conv"), float("nan"))
            totals["best"] += min(values)
        label = f"{channels}→{out} @{height}×{width}"
        print(f"{label:22s} {cells[0]:>18s} {cells[1]:>18s} {cells[2]:>26s}   "
              f"{rule.forward}/{rule.input_grad}/{rule.weight_grad}")  # fmt: skip
    if not shapes:
        print("no 1×1 convolution ran in matrix form (switched off, or the model has none)")
        return
    print(
        f"per step, all passes: rules {totals['rule']:.1f} ms, convolution everywhere "
        f"{totals['conv']:.1f} ms, best form of each pass {totals['best']:.1f} ms "
        f"(rules / convolution {totals['rule'] / totals['conv']:.3f}, "
        f"rules / best {totals['rule'] / totals['best']:.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nf_resnet50", help="a normfree model name")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=12,
                        help="timed train steps, at least 12: the steps cycle through the 12 "
                        "combinations of forms, so each form of a pass runs in a share of them")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    if args.model not in normfree.list_models():
        print(f"error: unknown --model {args.model!r}; see normfree.list_models()",
              file=sys.stderr)  # fmt: skip
        return 2
    combos = len(list(itertools.product(*FORMS.values())))
    if args.steps < combos:
        print(f"error: --steps must be at least {combos} (every combination of forms once)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = normfree.create_model(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, model.num_classes, (args.batch,))
    print(
        f"{datetime.date.today()} | torch {torch.__version__} | "
        f"{cpu_name()} | cpu | {torch.get_num_threads()} threads "
        f"| {args.model} | batch {args.batch} @{args.size}² | {args.steps} steps"
    )
    report(measure(model, x, y, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
