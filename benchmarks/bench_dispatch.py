"""Kernels per step, counted without an accelerator: the ATen operations one train step and one
eval step of each variant of :mod:`bench_train` dispatch on PyTorch's ``meta`` device, where
every variant takes the code path it takes on CUDA (no CPU-only matrix forms, no CPU kernels)
and no data is computed.

On a GPU, a step whose kernels are small is bound by the host: every operation costs the
host a few microseconds (Python, the dispatcher, a launch) whatever its size, and a host read
of a device value (``.item()``, ``nonzero``, ``equal``) or a blocking copy between host and
device stalls it until the GPU has caught up. These counts measure that cost where no GPU is
at hand; they are exact and do not vary from run to run. Views, detaches, empty allocations
and profiler markers launch no kernel and are not counted; a host read is counted in its own
column (the meta device has no value to read, so the count stands in a 0 and goes on).

    python benchmarks/bench_dispatch.py                       # every group, b8 @128²
    python benchmarks/bench_dispatch.py --group resnet50 --top 12   # and the commonest ops
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench_train import GROUPS, MissingPeer, make_variant
from dispatch_count import count_step

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", choices=sorted(GROUPS), default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--top", type=int, default=0, help="also list each variant's N commonest")
    args = parser.parse_args(argv)
    # SGD in its foreach form, CUDA's default (its fused kernel has no meta implementation)
    args.channels_last, args.precision, args.clock = False, "fp32", "wall"
    args.fused_optimizer, args.optimizer = False, "sgd"
    meta = torch.device("meta")
    print(f"torch {torch.__version__} | meta device (CUDA's code paths) | "
          f"batch {args.batch} @{args.size}² | SGD foreach")  # fmt: skip
    for group in args.group or list(GROUPS):
        rows = []
        for spec in GROUPS[group]:
            try:
                variant = make_variant(spec, args, meta)
            except MissingPeer as err:
                print(f"  skipped {spec}: {err}")
                continue
            except RuntimeError as err:  # e.g. a fused kernel without a meta implementation
                print(f"  skipped {spec}: {str(err).splitlines()[0]}")
                continue
            train = None if variant.train is None else count_step(variant.train)
            rows.append((spec, train, count_step(variant.eval)))
        if not rows:
            continue
        base = rows[0]
        print(f"\n[{group}] operations per step (kernels on CUDA), ratios to {base[0]}")
        print(f"{'variant':<30} {'train ops':>10} {'ratio':>7} {'host reads':>10} "
              f"{'eval ops':>9} {'ratio':>7}")  # fmt: skip
        for spec, train, ev in rows:
            if train is not None and base[1] is not None:
                t = f"{train.kernels():>10} {train.kernels() / base[1].kernels():>6.2f}x "
                t += f"{train.host_reads():>10}"
            else:
                t = f"{'-':>10} {'-':>7} {'-':>10}"
            print(f"{spec:<30} {t} {ev.kernels():>9} {ev.kernels() / base[2].kernels():>6.2f}x")
            if args.top and train is not None:
                common = ", ".join(f"{k} {n}" for k, n in train.counts.most_common(args.top))
                print(f"    {common}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
