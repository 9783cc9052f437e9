"""``normfree export``: fold a model and write it as ONNX or a ``torch.export`` program.

The source is a training checkpoint (``runs/…/best.pt``: the model is rebuilt from it, with its
EMA weights unless ``--raw``) or a model spec as for ``normfree spp`` (registered name,
``NAME[key=value,…]`` or ``package.module:factory``), optionally with ``--weights`` (any file
:func:`normfree.load_pretrained` reads).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torch import nn

from normfree.analysis.cli import add_trust_code_argument, check_recorded_size, positive_int
from normfree.atomic import overwritten_input
from normfree.console import report_error, report_out_of_memory
from normfree.deploy.export import (
    EXPORT_FORMATS,
    measured_stride,
    nearest_size,
    sizes_text,
    total_stride,
)

__all__ = ["add_parser", "run_export"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="fold a model and export it (ONNX or torch.export .pt2)",
        description="Fold weight standardization and proxy normalization into plain layers, "
        "export with a dynamic batch size at a fixed image size (or, with --dynamic-size, at any "
        "multiple of the model's total stride), and check the saved file against the eager "
        "model. Writes PATH and PATH.json (input shape, normalisation, classes, the check's "
        "result).",
    )
    p.add_argument("source", metavar="SOURCE",
                   help="training checkpoint (.pt) or model: NAME, NAME[key=value,...], "
                   "package.module:factory")  # fmt: skip
    suffixes = " or ".join(EXPORT_FORMATS.values())
    p.add_argument("--out", required=True, help=f"output file: {suffixes}")
    p.add_argument("--format", choices=sorted(EXPORT_FORMATS), default=None,
                   help="default: from the --out suffix")  # fmt: skip
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="input height = width (default: the checkpoint's test size, else the "
                   "model's)")  # fmt: skip
    p.add_argument("--dynamic-size", nargs="?", const=0, type=positive_int, default=None,
                   metavar="MULTIPLE",
                   help="height and width free too: any multiple of MULTIPLE from twice it "
                   "(default: the model's total stride, e.g. 32); --image-size is then the size "
                   "traced and checked first")  # fmt: skip
    p.add_argument("--weights", default=None,
                   help="weights for a model SOURCE (normfree, timm or DeepMind file)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow pickled files: DeepMind's .npz weights, and a whole converted "
                   "module written by `normfree convert --trust-pickle` (unpickling can run "
                   "code: only for files from a source you trust)")  # fmt: skip
    add_trust_code_argument(p)
    p.add_argument("--raw", action="store_true",
                   help="checkpoint SOURCE: export the raw weights, not the EMA weights")
    p.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="model option for a model SOURCE, e.g. num_classes=10 (repeatable)")
    p.add_argument("--opset", type=positive_int, default=None,
                   help="ONNX opset (default: the exporter's)")  # fmt: skip
    p.add_argument("--no-verify", action="store_true",
                   help="skip running the saved file against the eager model")
    p.set_defaults(func=run_export)


def _described_data(description: dict[str, Any]) -> dict[str, Any]:
    """The training data a converted model's description records (``normfree convert`` of a
    training checkpoint): name, mean, std and class names, each only if well-formed (the file
    is untrusted; these only go into the sidecar)."""
    data = description.get("data")
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        value = data.get(key)
        if isinstance(value, list) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            out[key] = [float(v) for v in value]
    classes = data.get("classes")
    if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
        out["classes"] = classes
    if isinstance(data.get("name"), str):
        out["name"] = data["name"]
    return out


def _described(model: nn.Module) -> nn.Module:
    """The module that declares ``model``'s metadata (name, sizes, preprocessing): the network
    inside a ``features_only`` backbone (:class:`~normfree.models.features.FeatureExtractor`),
    else ``model``."""
    from normfree.models.features import FeatureExtractor

    return model.model if isinstance(model, FeatureExtractor) else model


def _from_checkpoint(path: Path, raw: bool) -> tuple[nn.Module, dict[str, Any], str]:
    from normfree.train.checkpointing import checkpoint_model, load_checkpoint

    state = load_checkpoint(path)
    use_ema = not raw and bool(state.get("ema"))
    model = checkpoint_model(state, path, ema=use_ema)
    info = dict(state.get("data_info") or {})
    if not info:  # written before checkpoints recorded it: what the config says, if anything
        data = state["config"].get("data", {})
        info = {"test_size": data.get("test_size") or data.get("image_size")}
    info["in_chans"] = state["model_args"]["in_chans"]  # what the weights take, not a claim
    return model, info, "ema" if use_ema else "raw"


def _from_spec(args: argparse.Namespace) -> nn.Module:
    from normfree.analysis.cli import model_from_spec, parse_overrides
    from normfree.checkpoints import load_pretrained

    model = model_from_spec(args.source, parse_overrides(args.override))
    if args.weights:
        load_pretrained(model, args.weights, trust_pickle=args.trust_pickle)
    return model


def _size_multiple(model: nn.Module, asked: int | None, in_chans: int) -> int | None:
    """``--dynamic-size``: None (absent), the value given, or (given bare, 0) the model's
    total stride: declared in its ``feature_info``, else measured (a converted model)."""
    if asked is None or asked > 0:
        return asked
    stride = total_stride(model)
    if stride is None:
        stride = measured_stride(model, in_chans)
        if stride is None:
            raise ValueError(
                "the model declares no feature_info and no feature map of it scales with the "
                "input, so its total stride is unknown: give it, e.g. --dynamic-size 32"
            )
        print(f"note: the model declares no feature_info; its measured total stride is {stride}",
              file=sys.stderr)  # fmt: skip
    return stride


def _traced_size(size: int, multiple: int, given: bool) -> int:
    """The size a ``--dynamic-size`` export is traced and first checked at: ``--image-size``,
    which must be a multiple; else the declared size rounded to the nearest one (at least two:
    it is only the size traced, the file takes every multiple)."""
    if size % multiple == 0 and size >= 2 * multiple:
        return size
    nearest = nearest_size(size, multiple)
    if given and size % multiple:
        raise ValueError(
            f"--image-size {size} is not a multiple of --dynamic-size {multiple}: choose one "
            f"that is (e.g. {nearest})"
        )
    return nearest


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` whose file or sidecar (``PATH.json``) is a file being read (SOURCE,
    ``--weights``): the export reads it first, then would replace it with the exported model."""
    out = Path(args.out)
    clash = overwritten_input([("--out", out), ("--out", out.with_name(out.name + ".json"))],
                              [("SOURCE", args.source), ("--weights", args.weights)])  # fmt: skip
    if clash is not None:
        _, written, flag, given = clash
        raise ValueError(
            f"--out {args.out} would overwrite the {flag} file {given} (export writes "
            f"{Path(written).name}); write the export to another file"
        )


def run_export(args: argparse.Namespace) -> int:
    """Entry point of ``normfree export``."""
    from normfree.checkpoints import CheckpointError
    from normfree.checkpoints.errors import UnsafePickleError
    from normfree.deploy.export import ExportError, export_model

    source = Path(args.source)
    try:
        _check_out(args)
        from normfree.convert import is_converted_file, load_converted

        converted = None  # a `normfree convert` output file
        if source.is_file() and (args.weights or args.override):
            what = "converted-model file" if is_converted_file(source) else "checkpoint"
            raise ValueError(f"--weights/--override apply to a model SOURCE, not a {what}")
        if is_converted_file(source):
            converted = load_converted(source)
        elif source.is_file():
            try:
                model, info, weights = _from_checkpoint(source, args.raw)
            except UnsafePickleError as refused:
                if not args.trust_pickle:
                    raise refused.with_opt_in("--trust-pickle") from None
                converted = load_converted(source, trust_pickle=True)  # a pickled one
        else:
            model, info, weights = _from_spec(args), {}, args.weights or "initialisation"
            declared = getattr(getattr(_described(model), "meta", None), "data_config", None)
            if callable(declared):  # a normfree architecture's own preprocessing (pretrained_cfg)
                config = declared(int(getattr(_described(model), "in_chans", 3)))
                info = {"mean": list(config["mean"]), "std": list(config["std"])}
        if converted is not None:
            model, weights = converted, "raw"
            info = {"test_size": converted.meta.test_size, "in_chans": converted.in_chans,
                    **_described_data(converted.description)}  # fmt: skip
        meta = getattr(_described(model), "meta", None)
        size = args.image_size or info.get("test_size") or getattr(meta, "test_size", None)
        if not size:
            raise ValueError("pass --image-size (neither the source nor the model declares one)")
        if args.image_size is None:
            size = check_recorded_size(size, source)
        in_chans = int(info.get("in_chans") or getattr(_described(model), "in_chans", 3))
        multiple = _size_multiple(model, args.dynamic_size, in_chans)
        if multiple is not None:
            size = _traced_size(int(size), multiple, args.image_size is not None)
        free = "B is free"
        if multiple is not None:
            free += f", {sizes_text(multiple)}"
        metadata = {
            "model": getattr(meta, "name", type(model).__name__),
            "source": str(args.source),
            "weights": weights,
            "input": f"normalised float32 (B, C, H, W); {free}",
            "mean": info.get("mean"),
            "std": info.get("std"),
            "classes": info.get("classes"),
            "dataset": info.get("name"),
        }
        result = export_model(
            model, args.out, (in_chans, int(size), int(size)), format=args.format,
            opset=args.opset, verify=not args.no_verify, metadata=metadata,
            size_multiple=multiple,
        )  # fmt: skip
    except (CheckpointError, ExportError, ValueError, TypeError, KeyError, ImportError,
            OSError) as e:  # fmt: skip
        return report_error(e)
    except RuntimeError as e:  # an input the machine cannot allocate (--image-size)
        return report_out_of_memory(e, "use a smaller --image-size")
    folded = ", ".join(f"{n} {k}" for k, n in result.folded.items()) or "nothing"
    check = (
        f"checked with {result.verified_with}: max |diff| {result.max_abs_diff:.2e}"
        if result.verified_with
        else "not checked"
    )
    shape = ", ".join(map(str, result.input_shape))
    if result.size_multiple is not None:
        shape = f"{result.input_shape[0]}, H, W; {sizes_text(result.size_multiple)}"
    print(f"wrote {result.path} ({result.format}, input (B, {shape}), folded {folded}; {check})")
    return 0
