"""Whole-model inference: eager eval (WS inference cache) vs the folded model
(:func:`normfree.deploy.prepare_for_inference`) vs the exported ONNX model in onnxruntime,
measured side by side, interleaved round by round, in one process.

The eager-vs-folded ratio is what folding saves inside PyTorch (for WS models the eval cache
already removes the standardization, so ≈1; for proxy-normalized models folding also removes
the PN statistics); the onnxruntime column is what a deployment gets.

    python benchmarks/bench_inference.py             # nf_resnet50 and lnpn_resnet50 @224, batch 8
    python benchmarks/bench_inference.py --quick     # small models @32, batch 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

import normfree
from interleaved import cpu_name, median_ratio, time_interleaved
from normfree.deploy import export_model, prepare_for_inference

__all__ = ["main"]


def bench_model(name: str, size: int, batch: int, rounds: int, inner: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = normfree.create_model(name).eval()
    folded = prepare_for_inference(model)
    x = torch.randn(batch, 3, size, size)
    steps: dict[str, Callable[[], object]] = {}

    def eager() -> object:
        with torch.no_grad():
            return model(x)

    def fast() -> object:
        with torch.no_grad():
            return folded(x)

    steps["eager"], steps["folded"] = eager, fast
    try:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            export_model(model, path, (3, size, size))
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {"input": x.numpy()}
        steps["onnxruntime"] = lambda: session.run(None, feed)
    except ImportError:
        pass
    times = time_interleaved(steps, rounds, inner)
    out = {f"{k} ms": statistics.median(v) * 1e3 for k, v in times.items()}
    for k in steps:
        if k != "eager":
            out[f"{k}/eager"] = median_ratio(times[k], times["eager"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models @32, batch 4")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        models, size, batch, rounds = ["nf_resnet_cifar20", "lnpn_resnet_cifar20"], 32, 4, 5
    else:
        models, size, batch, rounds = ["nf_resnet50", "lnpn_resnet50"], 224, 8, 7
    rounds = args.rounds or rounds
    print(
        f"torch {torch.__version__} | {cpu_name()} | "
        f"{torch.get_num_threads()} threads | batch {batch} @{size}² | {rounds} rounds"
    )
    header = (
        f"{'model':<22} {'eager ms':>9} {'folded ms':>10} {'ort ms':>8} {'folded/eager':>13} "
        f"{'ort/eager':>10}"
    )
    print(header)
    print("-" * len(header))
    for name in models:
        r = bench_model(name, size, batch, rounds, inner=1 if not args.quick else 3)
        ort_ms = f"{r['onnxruntime ms']:>8.1f}" if "onnxruntime ms" in r else f"{'-':>8}"
        ort_ratio = f"{r['onnxruntime/eager']:>9.3f}x" if "onnxruntime/eager" in r else f"{'-':>10}"
        print(
            f"{name:<22} {r['eager ms']:>9.1f} {r['folded ms']:>10.1f} {ort_ms} "
            f"{r['folded/eager']:>12.3f}x {ort_ratio}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
