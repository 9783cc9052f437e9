"""``normfree convert SOURCE --to MODE --out PATH``: convert a trained BatchNorm network.

SOURCE is one of:

* an architecture: ``torchvision:NAME``, ``timm:NAME``, a registered normfree name, or
  ``package.module:factory`` (each optionally ``NAME[key=value,...]``, e.g.
  ``torchvision:resnet18[num_classes=10]``), with its weights from ``--weights``;
* a normfree training checkpoint (``runs/…/best.pt``; EMA weights unless ``--raw``) or a normfree
  model file (``normfree.save_model``);
* a file holding a whole pickled ``nn.Module``: only with ``--trust-pickle`` (unpickling runs
  code); the converted model is then written as a pickle too.

Calibration / error measurement input: ``--data SPEC`` (e.g. ``digits``; the first
``--calib-batches`` training batches, without augmentation), else Gaussian noise of
``--image-size``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfree.analysis.cli import positive_int
from normfree.atomic import overwritten_input, same_file
from normfree.console import report_error, report_out_of_memory

__all__ = [
    "add_parser",
    "evaluate_converted_file",
    "run_convert",
    "run_convert_experiment",
    "run_eval_converted",
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    from normfree.convert.modes import MODES

    modes = "; ".join(f"{k}: {v}" for k, v in MODES.items())
    p = sub.add_parser(
        "convert",
        help="convert a trained BatchNorm network into a batch-independent one",
        description="Turn a Conv→BatchNorm network into a BN-free, normalizer-free (scaled WS), "
        f"WS+GN or GN+Proxy-Norm network that keeps its weights. Modes: {modes}.",
    )
    p.add_argument("source", metavar="CHECKPOINT_OR_MODEL",
                   help="torchvision:NAME, timm:NAME, normfree NAME, module:factory (optionally "
                   "NAME[key=value,...]), a normfree checkpoint, or a pickled module file with "
                   "--trust-pickle")  # fmt: skip
    p.add_argument("--to", required=True, choices=sorted(MODES), help="conversion mode")
    p.add_argument("--out", required=True, help="output file: .safetensors or .pt")
    p.add_argument("--weights", default=None,
                   help="weights for an architecture SOURCE (state dict / normfree file)")
    p.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="argument of the architecture, e.g. num_classes=10 (repeatable)")
    p.add_argument("--data", default=None,
                   help="dataset spec for calibration and the error report, e.g. digits")
    p.add_argument("--calib-batches", type=positive_int, default=4,
                   help="batches of --data (default 4)")  # fmt: skip
    p.add_argument("--batch", type=positive_int, default=32,
                   help="calibration batch size (default 32)")  # fmt: skip
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="size of the Gaussian example input when there is no --data")
    p.add_argument("--standalone-bn", choices=("error", "affine"), default="error",
                   help="bn_free/nf: a BN not fed by a conv (pre-activation nets) becomes an "
                   "exact per-channel affine with 'affine' (default: error)")  # fmt: skip
    p.add_argument("--alpha", type=float, default=0.2, help="nf: residual branch scale α")
    p.add_argument("--max-groups", type=positive_int, default=32,
                   help="gn/gnpn: most GroupNorm groups")  # fmt: skip
    p.add_argument("--nf-fit", choices=("covariance", "mean"), default="covariance",
                   help="nf: how WS kernels are fitted on the calibration data")
    p.add_argument("--raw", action="store_true", help="checkpoint SOURCE: raw, not EMA weights")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a SOURCE file holding a pickled module (it can run code)")
    p.add_argument("--json", default=None, help="write the conversion report here")
    p.add_argument("--seed", type=int, default=0, help="seed of the Gaussian example input")
    p.set_defaults(func=run_convert)

    e = sub.add_parser(
        "convert-experiment",
        help="train a BN ResNet, convert it with every mode, fine-tune at several batch sizes",
        description="The experiment of docs/convert.md: held-out accuracy of the BN model and "
        "its conversions at conversion and while fine-tuning at batch sizes 2, 8, 64.",
    )
    e.add_argument("--data", default="digits", help="dataset spec (default: bundled digits)")
    e.add_argument("--pretrain-steps", type=int, default=300)
    e.add_argument("--finetune-steps", type=int, default=150)
    e.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8, 64])
    e.add_argument("--finetune-lr", type=float, default=0.01)
    e.add_argument("--clipping", type=float, default=0.05, help="AGC λ of the converted models")
    e.add_argument("--width", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    e.add_argument("--json", default=None, help="write the results here")
    e.add_argument("--figure", default=None, help="write the figure here (.png)")
    e.add_argument("--table", default=None, help="write the Markdown table here")
    e.set_defaults(func=run_convert_experiment)


def run_convert_experiment(args: argparse.Namespace) -> int:
    """Entry point of ``normfree convert-experiment``."""
    from normfree.atomic import atomic_write_json, atomic_write_text, check_writable
    from normfree.convert.experiment import (
        ExperimentConfig,
        plot_results,
        results_table,
        run_experiment,
    )

    try:
        check_writable(args.json, args.figure, args.table)
        torch.set_num_threads(args.threads)
        cfg = ExperimentConfig(
            data=args.data, width=args.width, pretrain_steps=args.pretrain_steps,
            finetune_steps=args.finetune_steps, batch_sizes=tuple(args.batch_sizes),
            finetune_lr=args.finetune_lr, clipping=args.clipping, seed=args.seed,
        )  # fmt: skip
        result = run_experiment(cfg)
        table = results_table(result)
        print(table)
        if args.json:
            atomic_write_json(args.json, result)
        if args.table:
            atomic_write_text(args.table, table + "\n")
        if args.figure:
            plot_results(result, args.figure)
            print(f"wrote {args.figure}")
    except (ValueError, TypeError, ImportError, OSError) as e:
        return report_error(e)
    print(f"done in {result['seconds']:.0f}s")
    return 0


def _split_spec(spec: str, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from normfree.analysis.cli import parse_model_spec

    name, kwargs = parse_model_spec(spec)
    return name, {**overrides, **kwargs}


def _from_file(
    path: Path, args: argparse.Namespace
) -> tuple[nn.Module, str | None, dict, dict]:
    """A model from a normfree checkpoint / model file, or a trusted pickled module: the model,
    its source spec and options, and the training data a checkpoint records (or ``{}``)."""
    from normfree.checkpoints import CheckpointError
    from normfree.checkpoints.errors import UnsafePickleError
    from normfree.checkpoints.io import load_tensors, load_trusted_pickle, safetensors_metadata
    from normfree.convert.api import is_converted_file

    if is_converted_file(path):  # not "a bare state dict": it has no BatchNorm left
        raise ValueError(
            f"{path} is already a converted model (a `normfree convert` output, without "
            "BatchNorm): convert the BatchNorm model it came from"
        )
    try:
        obj = load_tensors(path, trust_hint="--trust-pickle")
        if path.suffix == ".safetensors":  # save_model records the model in the header
            header = safetensors_metadata(path)
            if header.get("format") == "normfree.model" and "model_name" in header:
                obj = {"format": "normfree.model", "model_name": header["model_name"]}
    except UnsafePickleError:
        if not args.trust_pickle:
            raise
        obj = load_trusted_pickle(path)
        if not isinstance(obj, nn.Module):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not an nn.Module") from None
        return obj, None, {}, {}
    if isinstance(obj, dict) and "model_args" in obj:  # training checkpoint
        from normfree.train.checkpointing import checkpoint_model

        margs = obj["model_args"]
        model = checkpoint_model(obj, path, ema=not args.raw and bool(obj.get("ema")))
        kwargs = {"num_classes": margs["num_classes"], "in_chans": margs["in_chans"],
                  **margs["kwargs"]}  # fmt: skip
        data = obj.get("data_info") or {}  # the run's data, for export's sidecar
        return model, f"normfree:{margs['name']}", kwargs, data
    if isinstance(obj, dict) and obj.get("format") == "normfree.model":
        from normfree.checkpoints import load_pretrained
        from normfree.convert.sources import build_source

        model_name = str(obj["model_name"])
        if not re.fullmatch(r"[A-Za-z0-9_]+", model_name):  # a name, never a spec with options
            raise CheckpointError(f"{path}: its model_name {model_name!r} is not a model name")
        name, kwargs = f"normfree:{model_name}", _overrides(args)
        model = build_source(name, kwargs)
        load_pretrained(model, path)
        return model, name, kwargs, {}
    raise ValueError(
        f"{path} is neither a normfree training checkpoint nor a normfree model file; for a "
        "bare state dict give the architecture as SOURCE and the file as --weights"
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from normfree.analysis.cli import parse_overrides

    return parse_overrides(args.override)


def _from_spec(args: argparse.Namespace) -> tuple[nn.Module, str, dict]:
    from normfree.checkpoints import load_pretrained
    from normfree.convert.sources import build_source

    name, kwargs = _split_spec(args.source, _overrides(args))
    if ":" not in name:
        name = f"normfree:{name}"
    model = build_source(name, kwargs)
    if args.weights:
        fmt = "auto" if name.startswith("normfree:") else "state_dict"
        load_pretrained(model, args.weights, format=fmt)
    else:
        print("note: no --weights: converting randomly initialised weights", file=sys.stderr)
    return model, name, kwargs


def _input_channels(model: nn.Module) -> int | None:
    """The channels ``model`` takes: its ``in_chans``, else its first convolution's."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    takes = getattr(model, "in_chans", None) or getattr(first_conv, "in_channels", None)
    return None if takes is None else int(takes)


def _example(
    args: argparse.Namespace, model: nn.Module, run_data: dict[str, Any] | None = None
) -> torch.Tensor:
    """The calibration batch: ``--data``'s training images, else Gaussian noise at
    ``--image-size``, else at the size the source's training run fed it (a checkpoint's
    ``data_info``: digits are 8×8 where nf_resnet_cifar20 declares 32), else the model's."""
    in_chans = _input_channels(model)
    if args.data:
        from normfree.data import build_datasets

        bundle = build_datasets(args.data, image_size=args.image_size, augment=None)
        if in_chans is not None and bundle.in_chans != in_chans:
            raise ValueError(
                f"--data {args.data!r} has {bundle.in_chans} channels but the model takes "
                f"{in_chans}; give data of its input or the model's in_chans (--override)"
            )
        n = min(len(bundle.train), args.calib_batches * args.batch)
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(bundle.train), generator=g)[:n].tolist()
        return torch.stack([bundle.train[i][0] for i in idx])
    run_size = (run_data or {}).get("test_size") or (run_data or {}).get("image_size")
    size = args.image_size or run_size or getattr(getattr(model, "meta", None), "test_size", None)
    if not size:
        raise ValueError("pass --data or --image-size (the model declares no input size)")
    g = torch.Generator().manual_seed(args.seed)
    where = " (its training run's size)" if size == run_size and not args.image_size else ""
    print(f"note: no --data: calibrating and measuring on Gaussian noise at {size}×{size}"
          f"{where}", file=sys.stderr)  # fmt: skip
    return torch.randn(args.batch, in_chans or 3, size, size, generator=g)


def _check_outputs_distinct(args: argparse.Namespace) -> None:
    """Refuse an output path that is another output or an input: the report would replace the
    converted model (``--json`` = ``--out``), or the result the model it was converted from."""
    if same_file(args.out, args.json):
        raise ValueError(
            f"--json and --out are the same file ({args.out}): the report would replace the "
            "converted model; give the report another name"
        )
    clash = overwritten_input([("--out", args.out), ("--json", args.json)],
                              [("SOURCE", args.source), ("--weights", args.weights)])  # fmt: skip
    if clash is not None:
        out_flag, out, flag, _ = clash
        raise ValueError(
            f"{out_flag} {out} is the {flag} file: writing it would destroy the model being "
            "converted; write the result to another file"
        )


def _check_source_exists(spec: str) -> None:
    """A SOURCE that names a file (a path, or a checkpoint suffix) must exist: it is never a
    model name, and "unknown model 'runs/x/best.pt'" would not say what is wrong."""
    from normfree.analysis.cli import MODEL_FILE_SUFFIXES

    path = Path(spec)
    names_a_file = ":" not in spec and ("/" in spec or path.suffix in MODEL_FILE_SUFFIXES)
    if path.is_file() or not names_a_file:  # (timm:hf-hub:org/name is an architecture)
        return
    if path.is_dir():
        raise ValueError(f"{spec} is a folder: give a model file in it (a run folder's best.pt "
                         "or last.pt), or an architecture")  # fmt: skip
    raise ValueError(
        f"no file {spec!r} (an architecture is torchvision:NAME, timm:NAME, a normfree NAME or "
        "module:factory)"
    )


def run_convert(args: argparse.Namespace) -> int:
    """Entry point of ``normfree convert``."""
    from normfree.atomic import check_writable
    from normfree.checkpoints import CheckpointError
    from normfree.convert import ConversionError, convert_model, save_converted

    try:
        _check_outputs_distinct(args)
        check_writable(args.out, args.json)
        if Path(args.out).suffix not in (".safetensors", ".pt", ".pth"):
            raise ValueError(f"--out must end in .safetensors or .pt, got {args.out!r}")
        source = Path(args.source)
        _check_source_exists(args.source)
        if source.is_file():
            if args.weights:
                raise ValueError("--weights applies to an architecture SOURCE, not a file")
            model, spec, kwargs, data = _from_file(source, args)
        else:
            (model, spec, kwargs), data = _from_spec(args), {}
        example = _example(args, model, data)
        converted = convert_model(
            model, args.to, example, source=spec, source_kwargs=kwargs,
            standalone_bn=args.standalone_bn, residual_alpha=args.alpha,
            max_groups=args.max_groups, nf_fit=args.nf_fit,
        )  # fmt: skip
        converted.description["data"] = {k: data[k] for k in ("name", "mean", "std", "classes")
                                          if data.get(k) is not None}  # fmt: skip
        save_converted(converted, args.out, allow_pickle=spec is None)
        report = converted.report
        if args.json:
            from normfree.atomic import atomic_write_json

            atomic_write_json(args.json, report.to_dict())
    except (ConversionError, CheckpointError, ValueError, TypeError, KeyError, ImportError,
            OSError) as e:  # fmt: skip
        return report_error(e)
    except RuntimeError as e:  # an example the machine cannot allocate (--image-size, --batch)
        return report_out_of_memory(e, "use a smaller --image-size or --batch")
    print(report.summary())
    pickled = (
        " (a pickled module: `--trust-pickle` of eval, spp, diagnose and export reads it, "
        "and load_converted(PATH, trust_pickle=True))" if spec is None else ""
    )  # fmt: skip
    print(f"wrote {args.out}{pickled}")
    return 0


#: data specs that name their data alone (a recorded ``cifar10`` or ``imagefolder`` needs a path)
_PATH_FREE_DATA = ("digits", "hard-digits")


def evaluate_converted_file(
    path: str, data: str | None, *, batch_size: int | None = None, split: str = "val",
    device: str = "auto", image_size: int | None = None, test_size: int | None = None,
    workers: int = 0, precision: str | None = None, trust_pickle: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """``normfree eval`` of a converted-model file: top-1/top-5/loss on ``data``'s held-out (or
    training) split, in the result layout of :func:`normfree.train.evaluate.evaluate_checkpoint`
    (no EMA), with the same options (``precision`` None: fp32, the file records no run). A
    whole pickled module is read only with ``trust_pickle``."""
    from torch.utils.data import DataLoader

    from normfree.convert import load_converted
    from normfree.data import build_datasets
    from normfree.train.distributed import select_device
    from normfree.train.evaluate import evaluate

    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    model = load_converted(path, trust_pickle=trust_pickle).float()  # fp32, as the data
    if not data:  # the training run's data, where a converted checkpoint records it
        recorded = (getattr(model, "description", None) or {}).get("data") or {}
        name = recorded.get("name")
        if name not in _PATH_FREE_DATA:
            held = (f"it records dataset {name!r}, which needs its path (e.g. --data "
                    f"{name}:/path)" if name else "it records no dataset")  # fmt: skip
            raise ValueError(f"{path} is a converted model: pass --data ({held})")
        size = recorded.get("image_size")
        data = f"{name}:size={size}" if name == "hard-digits" and size else name
        image_size = image_size or size
        test_size = test_size or recorded.get("test_size")
    bundle = build_datasets(data, image_size=image_size, test_size=test_size, augment=None)
    if model.num_classes is None:
        raise ValueError(f"{path} has no classifier (no nn.Linear): eval needs class logits")
    if bundle.num_classes != model.num_classes or bundle.in_chans != model.in_chans:
        raise ValueError(
            f"dataset {data!r} has {bundle.num_classes} classes × {bundle.in_chans} channels but "
            f"{path} was built for {model.num_classes} × {model.in_chans}"
        )
    dataset = bundle.val if split == "val" else bundle.train
    loader = DataLoader(dataset, batch_size=batch_size or 256, shuffle=False, num_workers=workers)
    dev = select_device(device)
    metrics = evaluate(model.to(dev), loader, dev, precision=precision or "fp32")
    return {"checkpoint": str(path), "model": model.meta.name, "data": data, "split": split,
            "test_size": getattr(bundle, "test_size", None), "count": metrics["count"],
            "raw": metrics, "ema": None}  # fmt: skip


def run_eval_converted(args: argparse.Namespace) -> int:
    """``normfree eval FILE`` for a converted-model file (same output as for checkpoints)."""
    from normfree.atomic import atomic_write_json, check_writable
    from normfree.checkpoints import CheckpointError

    try:
        check_writable(args.json)  # before the evaluation, not after it
        result = evaluate_converted_file(
            args.checkpoint, args.data, batch_size=args.batch_size, split=args.split,
            device=args.device, image_size=args.image_size, test_size=args.test_size,
            workers=args.workers, precision=args.precision,
            trust_pickle=getattr(args, "trust_pickle", False),
        )  # fmt: skip
    except (CheckpointError, ValueError, OSError, ImportError) as e:
        return report_error(e)
    except RuntimeError as e:  # images the machine cannot allocate (sizes, --batch-size)
        return report_out_of_memory(e, "use a smaller --test-size / --image-size or --batch-size")
    m = result["raw"]
    print(f"{result['model']} on {result['data']} ({result['split']}, {result['count']} images)")
    print(f"  raw  top1 {m['top1']:6.2f}%  top5 {m['top5']:6.2f}%  loss {m['loss']:.4f}")
    if args.json:
        try:
            atomic_write_json(args.json, result)
        except OSError as e:
            return report_error(e)
    return 0
