"""Whole-model training and evaluation speed: normfree's NF models against timm's ports, a
BatchNorm ResNet-50 and the "no-norm" floor, interleaved round by round in one process.

A train step is ``zero_grad → forward → cross-entropy → backward → AGC (λ = 0.01, classifier
excluded; only for the models trained with it) → SGD-momentum step`` (``--optimizer adamw``:
AdamW with weight decay 0.05); an eval step is a
``torch.no_grad`` forward in eval mode. "no-norm" is torchvision's ResNet-50 with every
BatchNorm replaced by ``nn.Identity``: the same convolutions and nothing else, the floor any
normalizer-free ResNet-50 can reach. Within each group every variant runs once per round in a
fresh random order (:mod:`interleaved`), and ratios are the medians of the per-round ratios.

Denormals are flushed to zero (``torch.set_flush_denormal``, before any thread starts). The
steps use lr 1e-5, so a zero-initialised skip gain (SkipInit, normfree's NF-ResNets; timm's
ports have none) stays ~1e-9 and the gradients inside those branches sit at ~1e-14, where
products underflow to denormals: without the flush a normfree nf_resnet50 backward costs ~30%
more (315 vs 239 ms at 2 threads), with skip gains at a trained 0.2 the flush changes nothing.
In real training the gains leave zero within the first steps.

glibc's allocator: by default glibc hands freed heap memory back to the kernel and faults it
in again on the next step, depending on where the heap's top happens to lie (and, in one
process, on what the other variants left there). ``--malloc tuned`` applies
:func:`normfree.train.allocator.tune_malloc`, what ``normfree train`` does on CPU, to the whole
process, so that no variant's step takes page faults; the header says which was used.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` of the train steps; on CPU the peak
resident set (``VmHWM``) of a fresh child process that builds the variant and runs three
train steps (it includes the interpreter and libraries, ~0.3 GiB, the same for every variant).

    python benchmarks/bench_train.py --threads 2             # b8 @128², 7 rounds
    python benchmarks/bench_train.py --quick --threads 2     # 3 rounds, no memory column
    python benchmarks/bench_train.py --group resnet50 --channels-last
    python benchmarks/bench_train.py --group resnet50 --fused-optimizer
    python benchmarks/bench_train.py --group resnet50 --malloc tuned   # as normfree train
    python benchmarks/bench_train.py --device cuda --batch 64 --size 224 --precision bf16
    python benchmarks/bench_train.py --compile --group resnet50 \
        --only torchvision:resnet50_nonorm,normfree:nf_resnet50,timm:nf_resnet50
    python benchmarks/bench_train.py --only normfree:nf_resnet50,normfree:nf_resnet50:sd,\
normfree:nf_resnet50:folded --group resnet50      # extra variants: :sd, :folded
    python benchmarks/bench_train.py --group resnet50 --only torchvision:resnet50_nonorm,\
torchvision:resnet50_nonorm:fastpool,normfree:nf_resnet50   # the floor with normfree's pool
    python benchmarks/bench_train.py --group resnet50 --only torchvision:resnet50_nonorm,\
normfree:nf_resnet50:native,normfree:nf_resnet50:native:inbwd   # the step in the backward
    python benchmarks/bench_train.py --group resnet50 --optimizer adamw --only \
normfree:nf_resnet50:native,normfree:nf_resnet50:native:inbwd   # AdamW's step, the same

``--compile`` compiles normfree's models with :func:`normfree.nn.compile_options` (what
``normfree train --compile`` uses: on CPU, inductor's ``conv_1x1_as_mm``) and the peers with
``torch.compile``'s defaults, as their users would.

A ``:native:inbwd`` variant (in every group) also applies the optimizer's step
of the model's Scaled-WS conv weights inside their native backward, fused with AGC
(:func:`normfree.optim.update_in_backward`); its AGC share is that of the other parameters,
and it is compared round by round with the ``:native`` row.

timm and torchvision are optional (``pip install normfree[bench]``); a missing peer is skipped
with a message. The ``:native`` rows (normfree's opt-in native CPU kernels, built on first use:
a C++ compiler and ~30 s once) are skipped with a message where they cannot be built, and on
accelerators; each is also compared round by round with the same model on the default path
when both rows run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import normfree
from interleaved import cpu_name, median_ratio, time_interleaved
from normfree.nn import NFResidualBlock, compile_options, native_kernels
from normfree.nn.pooling import max_pool2d
from normfree.optim import AGC, update_in_backward
from normfree.train.allocator import tune_malloc

__all__ = ["GROUPS", "build_variant", "main"]

# group -> variants "source:model" (the first is the reference of the printed ratios)
GROUPS: dict[str, list[str]] = {
    "resnet50": [
        "torchvision:resnet50_nonorm",
        "normfree:nf_resnet50",
        "normfree:nf_resnet50:native",
        "normfree:nf_resnet50:native:inbwd",
        "normfree:nf_resnet50:plain",
        "normfree:nf_resnet50:folded",
        "timm:nf_resnet50",
        "torchvision:resnet50",
        "normfree:lnpn_resnet50",
    ],
    "nfnet_f0": [
        "timm:dm_nfnet_f0",
        "normfree:nfnet_f0",
        "normfree:nfnet_f0:native",
        "normfree:nfnet_f0:native:inbwd",
        "normfree:nfnet_f0:native=tanh_gelu",
        "normfree:nfnet_f0:plain",
    ],
    "nf_regnet_b0": [
        "timm:nf_regnet_b0",
        "normfree:nf_regnet_b0",
        "normfree:nf_regnet_b0:native",
        "normfree:nf_regnet_b0:native:inbwd",
    ],
}
# models trained with AGC (Brock et al. 2021b); the others get no clipping
USES_AGC = {"nf_resnet50", "nfnet_f0", "dm_nfnet_f0", "nf_regnet_b0"}


class MissingPeer(RuntimeError):
    """An optional peer library is not installed."""


def _import(name: str):
    try:
        return __import__(name)
    except ImportError as err:
        raise MissingPeer(f"{name} is not installed (pip install normfree[bench])") from err


def build_variant(spec: str, num_classes: int = 1000) -> nn.Module:
    """The model behind ``source:name[:variant]`` (raises :class:`MissingPeer` if its library is
    absent).

    normfree models are built with stochastic depth and dropout off, as timm's ports and
    torchvision's ResNet-50 are by default, so every variant of a group does the same work;
    ``:sd`` keeps the official regularisation (stochastic depth 0.1–0.25, dropout 0.2–0.25),
    ``:plain`` runs every block in the paper's form (every scale an op on the activations),
    ``:folded`` is the deployment copy of :func:`normfree.deploy.prepare_for_inference` (plain
    convs; eval only) and ``:native`` is the default model timed with the native CPU kernels
    of :mod:`normfree.nn.native` (switched on around its steps only; ``:native=tanh_gelu``
    or ``:native=scaled_ws`` with only that pair)."""
    source, name, *variant = spec.split(":")
    if source == "normfree":
        off = {} if variant == ["sd"] else {"drop_path_rate": 0.0, "drop_rate": 0.0}
        model = normfree.create_model(name, num_classes=num_classes, **off)
        if variant == ["plain"]:
            for block in model.modules():
                if isinstance(block, NFResidualBlock):
                    block.fold_scales = False
        if variant == ["folded"]:
            from normfree.deploy import prepare_for_inference

            model = prepare_for_inference(model)
        return model
    if source == "timm":
        return _import("timm").create_model(name, num_classes=num_classes)
    if source == "torchvision":
        models = _import("torchvision").models
        model = models.resnet50(num_classes=num_classes)
        if name == "resnet50_nonorm":
            for parent in list(model.modules()):
                for child_name, child in list(parent.named_children()):
                    if isinstance(child, nn.BatchNorm2d):
                        setattr(parent, child_name, nn.Identity())
        if variant == ["fastpool"]:
            model.maxpool = _FastMaxPool()
        return model
    raise ValueError(f"unknown source {source!r} in {spec!r}")


class _FastMaxPool(nn.Module):
    """torchvision's stem pool (3×3, stride 2, padding 1) through
    :func:`normfree.nn.pooling.max_pool2d`, normfree's faster CPU kernel choice with the same
    numbers: the ``:fastpool`` floor shows how much of normfree's lead over the floor is that
    choice alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d(x, 3, 2, (1, 1))


def _agc(spec: str, model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None] | None:
    if spec.split(":")[1] not in USES_AGC:
        return None
    if spec.startswith("normfree:"):
        agc = AGC(opt, clipping=0.01, model=model)
        agc.remove()  # timed as its own call below; the step hook would clip a second time
        return agc.clip_grad_
    # timm's own clipping (its per-parameter loop), the classifier excluded as in its trainer
    from timm.utils import adaptive_clip_grad

    head = {id(p) for p in model.get_classifier().parameters()}
    params = [p for p in model.parameters() if id(p) not in head]
    return lambda: adaptive_clip_grad(params, clip_factor=0.01)


@dataclass
class Variant:
    spec: str
    train: Callable[[], object] | None  # None: an eval-only variant (":folded")
    eval: Callable[[], object]
    compile_seconds: float | None = None
    agc_seconds: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


COMPILED = "+compile"  # suffix of a variant's torch.compile'd twin (``--compile``)


IN_BACKWARD = ":inbwd"  # suffix: the Scaled-WS weights' optimizer step inside their backward


def _native_choice(spec: str) -> bool | list[str]:
    """The native kernels a spec's last part (before ``:inbwd``) asks for: ``native`` all
    (True), ``native=a+b`` those named (checked by :func:`normfree.nn.native_kernels`), anything
    else none (False)."""
    last = spec.removesuffix(IN_BACKWARD).rsplit(":", 1)[-1]
    if last == "native":
        return True
    if last.startswith("native="):
        return last.removeprefix("native=").split("+")
    return False


def make_variant(spec: str, args: argparse.Namespace, device: torch.device) -> Variant:
    compiled = spec.endswith(COMPILED)
    torch.manual_seed(0)
    model = build_variant(spec.removesuffix(COMPILED)).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    fused = {"fused": True} if args.fused_optimizer else {}
    if device.type == "meta" and not fused:  # bench_dispatch: SGD's form on CUDA by default
        fused = {"foreach": True}
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05, **fused)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9, **fused)
    clip = _agc(spec.removesuffix(COMPILED), model, opt)
    if spec.removesuffix(COMPILED).endswith(IN_BACKWARD):
        if not spec.startswith("normfree:") or not _native_choice(spec.removesuffix(COMPILED)):
            raise MissingPeer(f"{IN_BACKWARD} needs a normfree model with its native kernels")
        update_in_backward(opt, model, agc=None if clip is None else clip.__self__)
    fwd = model
    if compiled:  # normfree's models with normfree's inductor options; peers with the defaults
        options = compile_options(device) if spec.startswith("normfree:") else {}
        fwd = torch.compile(model, options=options)
    loss_fn = nn.CrossEntropyLoss()
    v = Variant(spec, train=None, eval=lambda: None)
    native = _native_choice(spec.removesuffix(COMPILED))
    if native and device.type != "cpu":
        raise MissingPeer("the native kernels are CPU-only")
    if native:
        try:
            with native_kernels(native) as built:  # build now, not inside the first timed step
                if not built:
                    raise MissingPeer("normfree's native CPU kernels cannot be built here")
        except ValueError as err:  # a name not in normfree.nn.native.KERNELS
            raise MissingPeer(str(err)) from err

    def kernels() -> contextlib.AbstractContextManager:
        # ":native": normfree's native CPU kernels for this variant only (built on first use)
        return native_kernels(native) if native else contextlib.nullcontext()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    clock = time.process_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter
    bf16 = getattr(args, "precision", "fp32") == "bf16"

    def autocast() -> contextlib.AbstractContextManager:
        if not bf16:  # (no autocast context at all: the meta device of bench_dispatch has none)
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def train() -> object:
        model.train()
        start = clock()
        opt.zero_grad(set_to_none=True)
        with kernels():
            with autocast():
                loss = loss_fn(fwd(x), y)
            loss.backward()
        if clip is not None:
            sync()
            t0 = clock()
            clip()
            sync()
            v.agc_seconds.append(clock() - t0)
        opt.step()
        sync()
        v.step_seconds.append(clock() - start)
        return loss

    def evaluate() -> object:
        model.eval()
        with torch.no_grad(), kernels(), autocast():
            out = fwd(x)
        sync()
        return out

    eval_only = spec.removesuffix(COMPILED).endswith(":folded")
    v.train, v.eval = (None if eval_only else train), evaluate
    if compiled:  # the first calls compile (train graph, then eval graph); time them
        start = time.perf_counter()
        if v.train is not None:
            v.train()
        v.eval()
        v.compile_seconds = time.perf_counter() - start
        v.step_seconds.clear()
        v.agc_seconds.clear()
    return v


def _child_peak(spec: str, args: argparse.Namespace) -> float:
    """Peak RSS (MiB) of a fresh process that runs three train steps of ``spec`` (CPU)."""
    cmd = [sys.executable, __file__, "--_peak", spec, "--batch", str(args.batch),
           "--size", str(args.size), "--threads", str(torch.get_num_threads())]  # fmt: skip
    if args.channels_last:
        cmd.append("--channels-last")
    if args.fused_optimizer:
        cmd.append("--fused-optimizer")
    cmd += ["--precision", args.precision, "--malloc", args.malloc, "--optimizer", args.optimizer]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return float("nan")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def _peak_rss_kib() -> float:
    """This process's peak resident set in KiB. Linux: ``VmHWM`` of /proc/self/status, the
    high-water mark of this address space. Not ``ru_maxrss``: Linux carries it over ``exec``
    from the forking parent, so every child would report at least the benchmark's own RSS."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _peak_main(spec: str, args: argparse.Namespace) -> None:
    v = make_variant(spec, args, torch.device("cpu"))
    for _ in range(3):
        v.train()
    print(json.dumps({"peak_mib": _peak_rss_kib() / 1024}))


def _profile(spec: str, args: argparse.Namespace) -> None:
    """A torch.profiler table of 3 train steps of ``spec``; on CUDA also the time the GPU's
    kernels take per step. Compare it with the step's unprofiled time from the benchmark's
    table (the profiler slows the host): a step much longer than its kernels is bound by the
    host (Python, dispatch and launches), not by the GPU."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    v = make_variant(spec, args, device)
    v.train()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(3):
            v.train()
        wall = (time.perf_counter() - start) / 3  # the steps only, not the profiler's set-up
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 3 / 1e6  # µs over 3 steps
        print(f"{spec}: {wall * 1e3:.1f} ms per step under the profiler (which slows the host), "
              f"GPU kernels {busy * 1e3:.1f} ms per step")  # fmt: skip
        print(events.table(sort_by="self_device_time_total", row_limit=20))
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))


def _peer_versions() -> str:
    """", timm X, torchvision Y" for the peers installed (their speed moves between releases)."""
    found = []
    for name in ("timm", "torchvision"):
        try:
            found.append(f", {name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return "".join(found)


def _in_group(spec: str, group: str) -> bool:
    """True when ``spec`` (e.g. an extra ``normfree:nf_resnet50:sd`` from ``--only``) is a
    variant of a model listed in ``group``."""
    source, name = spec.split(":")[:2]
    return any(s.split(":")[:2] == [source, name] for s in GROUPS[group])


def run_group(name: str, args: argparse.Namespace, device: torch.device) -> None:
    variants: dict[str, Variant] = {}
    keep = None if args.only is None else set(args.only.split(","))
    specs = [s for s in GROUPS[name] if keep is None or s in keep]
    specs += [s for s in (keep or ()) if s not in GROUPS[name] and _in_group(s, name)]
    if args.compile:
        specs += [s + COMPILED for s in specs if not s.endswith(":plain")]
    for spec in specs:
        try:
            variants[spec] = make_variant(spec, args, device)
        except MissingPeer as err:
            print(f"  skipped {spec}: {err}")
    if not variants:
        return
    base = next(iter(variants))
    peaks: dict[str, float] = {}
    for spec in variants:
        if variants[spec].train is None or spec.endswith(COMPILED):
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            variants[spec].train()
            variants[spec].train()
            peaks[spec] = torch.cuda.max_memory_allocated() / 2**20
        elif not args.quick:
            peaks[spec] = _child_peak(spec, args)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    trainable = {k: v.train for k, v in variants.items() if v.train is not None}
    train_t = time_interleaved(trainable, args.rounds, 1, clock=clock)
    eval_t = time_interleaved({k: v.eval for k, v in variants.items()}, args.rounds, 1,
                              clock=clock)  # fmt: skip
    width = max(30, *(len(spec) for spec in variants))
    header = (
        f"{'variant':<{width}} {'train ms':>9} {'/' + base.split(':')[1][:12]:>14} {'eval ms':>8} "
        f"{'/' + base.split(':')[1][:12]:>14} {'AGC %':>6} {'peak MiB':>9}"
    )
    print(f"\n[{name}] ratios to {base}")
    print(header)
    print("-" * len(header))
    for spec, v in variants.items():
        share = [a / s for a, s in zip(v.agc_seconds, v.step_seconds)]
        agc = f"{100 * statistics.median(share):>5.1f}%" if share else f"{'-':>6}"
        peak = f"{peaks[spec]:>9.0f}" if spec in peaks else f"{'-':>9}"
        if spec in train_t:
            train = (f"{statistics.median(train_t[spec]) * 1e3:>9.1f} "
                     f"{median_ratio(train_t[spec], train_t[base]):>13.3f}x")  # fmt: skip
        else:
            train = f"{'-':>9} {'-':>14}"
        compiled = "" if v.compile_seconds is None else f"  (compiled in {v.compile_seconds:.0f} s)"
        print(
            f"{spec:<{width}} {train} {statistics.median(eval_t[spec]) * 1e3:>8.1f} "
            f"{median_ratio(eval_t[spec], eval_t[base]):>13.3f}x {agc} {peak}{compiled}"
        )
    pairs = [(a, b) for a in train_t for b in train_t if a != b and a != base and
             a.startswith("normfree:") and not b.startswith("normfree:") and b != base and
             a.endswith(COMPILED) == b.endswith(COMPILED)]  # fmt: skip
    pairs += [(a + COMPILED, a) for a in train_t if a + COMPILED in train_t]
    # each ":native..." row against the same model on the default path, round by round
    plain = {a: a.rsplit(":", 1)[0] for a in train_t if _native_choice(a)}
    pairs += [(a, b) for a, b in plain.items() if b in train_t]
    for a, b in pairs:
        spread = sorted(t / u for t, u in zip(train_t[a], train_t[b]))
        print(
            f"  {a} / {b}: train {median_ratio(train_t[a], train_t[b]):.3f}x "
            f"(rounds {spread[0]:.3f}-{spread[-1]:.3f}), "
            f"eval {median_ratio(eval_t[a], eval_t[b]):.3f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--compile", action="store_true",
                        help="add a torch.compile'd twin (inductor) of every variant, timed in the "
                        "same interleaved run as its eager form")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: forward and loss under torch.autocast (as normfree train's "
                        "train.precision=bf16)")
    parser.add_argument("--fused-optimizer", action="store_true",
                        help="PyTorch's fused SGD/AdamW for every variant (normfree train's "
                        "default where available) instead of its per-tensor loop")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="every variant's optimizer: SGD with momentum 0.9, or AdamW with "
                        "weight decay 0.05 (lr 1e-5)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, no memory column")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--group", action="append", choices=sorted(GROUPS), default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time (steadier on a shared machine; use with "
                        "--threads 1, where no OpenMP thread spins)")
    parser.add_argument("--only", default=None, help="comma-separated variants to keep")
    parser.add_argument("--malloc", choices=("default", "tuned"), default="default",
                        help="tuned: glibc keeps freed memory (normfree.train.tune_malloc, "
                        "what normfree train does on CPU) for every variant; default: as is")
    parser.add_argument("--profile", default=None, metavar="VARIANT",
                        help="print a torch.profiler table of 3 train steps of VARIANT and exit")
    parser.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    malloc = tune_malloc() if args.malloc == "tuned" else "malloc: as is"
    if args._peak:
        _peak_main(args._peak, args)
        return 0
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
    except RuntimeError as err:
        print(f"error: bad --device {args.device!r}: {err}", file=sys.stderr)
        return 2
    if args.profile:
        _profile(args.profile, args)
        return 0
    args.rounds = args.rounds or (3 if args.quick else 7)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = args.device
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    print(
        f"{datetime.date.today()} | torch {torch.__version__}{_peer_versions()} | "
        f"{cpu_name()} | {where} | "
        f"{torch.get_num_threads()} threads | batch {args.batch} @{args.size}² | "
        f"{args.rounds} rounds | {args.clock} clock | compile={args.compile} "
        f"channels_last={args.channels_last} optimizer={args.optimizer} "
        f"fused_optimizer={args.fused_optimizer} "
        f"precision={args.precision} | {malloc} | "
        f"load {load:.1f}"
    )
    for name in args.group or list(GROUPS):
        run_group(name, args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
