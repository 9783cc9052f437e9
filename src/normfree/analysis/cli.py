"""``normfree spp`` and ``normfree diagnose``: the analysis tools on the command line.

MODEL is a registered name (``normfree models``), optionally with its own overrides in brackets
(``'nf_resnet_cifar56[use_ws=False]'``), or ``package.module:factory`` for any callable returning
an ``nn.Module`` (``torchvision.models:resnet18``; then pass ``--image-size``). ``--override
key=value`` applies to every model; values are parsed as YAML scalars (``False``, ``0.2``,
``relu``, ``[1, 2]``).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from normfree.atomic import check_writable, overwritten_input, same_file
from normfree.checkpoints import CheckpointError
from normfree.console import (
    error_line,
    out_of_memory,
    report_error,
    report_out_of_memory,
    yaml_problem,
)

__all__ = [
    "LARGEST_RECORDED_SIDE", "MODEL_FILE_SUFFIXES", "add_parser", "add_trust_code_argument",
    "add_trust_pickle_argument",
    "check_outputs", "check_recorded_size", "model_from_spec", "model_input_errors",
    "parse_model_spec", "parse_overrides", "positive_int", "seed_int",
]  # fmt: skip

#: suffixes that make a model spec a file path, never a model name (also ``normfree convert``)
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz", ".bin", ".ckpt")
_SPEC = re.compile(r"^(?P<name>[^\[\]]+?)(?:\[(?P<kw>.*)\])?$")


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def positive_int(text: str) -> int:
    """argparse ``type`` of a size or count option: an int ≥ 1 (``--image-size 0`` is refused,
    not read as "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


SEED_RANGE = (-(2**63), 2**63 - 2)  # torch's 64-bit seeds; the sensitivity noise uses seed + 1


def seed_int(text: str) -> int:
    """argparse ``type`` of ``--seed``: an int that torch's 64-bit generators take (a larger
    one ended in torch's "Overflow when unpacking long long")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value} is out of range; use a seed from 0 to {high}")
    return value


def add_trust_code_argument(p: argparse.ArgumentParser) -> None:
    """``--trust-code`` of every command that reads converted-model files (the main CLI opens
    :func:`normfree.convert.trusting_code` around the command when it is given)."""
    p.add_argument("--trust-code", action="store_true",
                   help="let converted-model files (and train's distill.teacher) name any "
                   "package.module:factory architecture (building it imports and runs that "
                   "code: only for files you trust)")  # fmt: skip


def add_trust_pickle_argument(p: argparse.ArgumentParser) -> None:
    """``--trust-pickle`` of the commands that read a converted model: it lets them read a whole
    pickled module, which ``normfree convert --trust-pickle`` writes for a model it cannot
    describe by name."""
    p.add_argument("--trust-pickle", action="store_true",
                   help="read a converted model stored as a whole pickled module (written by "
                   "`normfree convert --trust-pickle`; unpickling can run code: only for "
                   "files you trust)")  # fmt: skip


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["use_ws=False", "alpha=0.5"]`` → ``{"use_ws": False, "alpha": 0.5}`` (YAML values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"override must look like key=value, got {item!r}")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(
                f"override {item!r}: the value is not valid YAML ({yaml_problem(e)}); close "
                "brackets and quote strings, e.g. alpha=0.2 or widths=[16,32]"
            ) from None
    return out


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name[k=v,k2=v2]"`` → ``("name", {k: v, k2: v2})``."""
    match = _SPEC.match(spec.strip())
    if not match:
        raise ValueError(f"cannot parse model {spec!r}; use NAME or NAME[key=value,...]")
    kw = match.group("kw")
    try:
        return match.group("name").strip(), parse_overrides(_split_top_level(kw) if kw else [])
    except ValueError as e:
        raise ValueError(f"model {spec!r}: {e}") from None


def model_from_spec(
    spec: str, overrides: dict[str, Any] | None = None, *, trust_pickle: bool = False
) -> nn.Module:
    """Build the model named by ``spec`` (registered name or ``module:factory``), or load the
    converted model in the file ``spec`` (``normfree convert``; a pickled module only with
    ``trust_pickle``)."""
    from normfree.convert import is_converted_file, load_converted

    names_a_file = "/" in spec or Path(spec).suffix in MODEL_FILE_SUFFIXES  # never a model name
    if names_a_file and not Path(spec).exists():
        raise ValueError(f"no file {spec!r} (a model is NAME, NAME[key=value,...] or module:fn)")
    if names_a_file and Path(spec).is_dir():
        raise ValueError(f"{spec} is a folder: give a model file in it (a run folder's best.pt "
                         "or last.pt), or a model NAME")  # fmt: skip
    if (names_a_file and Path(spec).is_file()) or is_converted_file(spec):  # the load says why not
        if overrides:
            raise ValueError(f"{spec}: a converted model file takes no --override")
        return load_converted(spec, trust_pickle=trust_pickle)
    name, own = parse_model_spec(spec)
    kwargs = {**(overrides or {}), **own}
    if ":" in name:
        module_name, _, attr = name.partition(":")
        factory = getattr(importlib.import_module(module_name), attr, None)
        if not callable(factory):
            raise ValueError(f"{name!r}: {module_name} has no callable {attr!r}")
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name!r} returned {type(model).__name__}, not an nn.Module")
        return model
    from normfree.models import UnknownModelError, create_model

    try:
        return create_model(name, **kwargs)
    except UnknownModelError as e:
        if not Path(spec).is_dir():
            raise
        raise ValueError(
            f"{str(e.args[0] if e.args else e).rstrip('.')}; {spec!r} is a folder here: give a "
            "model file in it "
            f"({Path(spec) / 'best.pt'} or {Path(spec) / 'last.pt'} of a run folder)"
        ) from None


LARGEST_RECORDED_SIDE = 4096  # an input size read from a file beyond this is not taken on trust


def check_recorded_size(size: Any, source: object) -> int:
    """An input side length that a file (checkpoint, converted model) records: a positive int
    up to :data:`LARGEST_RECORDED_SIDE`, else ``ValueError`` asking for ``--image-size``."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= LARGEST_RECORDED_SIDE:
        raise ValueError(f"{source} records an input size of {size!r}; pass --image-size")
    return size


def _input_shape(model: nn.Module, spec: str, image_size: int | None) -> tuple[int, int, int]:
    in_chans = getattr(model, "in_chans", 3)
    if image_size is None:
        meta = getattr(model, "meta", None)
        image_size = getattr(meta, "test_size", None)
        if image_size is None:
            raise ValueError(f"{spec}: pass --image-size (the model does not declare one)")
        image_size = check_recorded_size(image_size, spec)  # a converted file's, e.g.
    return (int(in_chans), int(image_size), int(image_size))


def check_outputs(models: list[str] | None = None, **paths: str | None) -> None:
    """Fail before the analysis when two output options (``json="a.json"`` for ``--json``) name
    the same file (the second write would replace the first), or one names a model file being
    read (``models``)."""
    read = [spec for spec in models or [] if Path(spec).is_file()]
    taken: list[tuple[str, str]] = []  # (option, path) of the outputs checked so far
    for option, given in paths.items():
        if not given:
            continue
        flag = f"--{option.replace('_', '-')}"
        clash = overwritten_input([(flag, given)], [(spec, spec) for spec in read])
        if clash is not None:
            raise ValueError(f"{flag} {given} would overwrite the model file {clash[3]}; write "
                             "elsewhere")  # fmt: skip
        other = next((f for f, path in taken if same_file(given, path)), None)
        if other is not None:
            raise ValueError(f"{other} and {flag} both name {given}; give each its own file")
        taken.append((flag, given))


def _raised_in_forward(err: BaseException) -> bool:
    """``err`` came out of a module's forward pass (a frame of ``nn.Module.__call__`` is on its
    traceback) and not out of the analysis code (no frame of ``normfree/analysis`` after it: the
    measurement hooks run inside that call)."""
    files = [Path(f.filename).as_posix() for f in traceback.extract_tb(err.__traceback__)]
    calls = [i for i, f in enumerate(files) if f.endswith("torch/nn/modules/module.py")]
    return bool(calls) and not any("normfree/analysis/" in f for f in files[calls[0] + 1 :])


@contextmanager
def model_input_errors(spec: str, shape: tuple[int, ...]) -> Iterator[None]:
    """Report a model that raises on the analysis batch of ``shape`` (a pool left with no pixels,
    a ViT's fixed image size) as the ``ValueError`` of a size it cannot take, in one line; an
    allocation failure, or an error of the analysis code itself, passes through unchanged."""
    try:
        yield
    except (RuntimeError, AssertionError, ValueError) as err:  # BN: "Expected more than 1 value"
        if out_of_memory(err, "") is not None or not _raised_in_forward(err):
            raise
        raise ValueError(f"{spec} fails on a batch of shape {shape}: {error_line(err)}; pass an "
                         "--image-size (and --batch) that it accepts") from err  # fmt: skip


def _zero_gains(model: nn.Module) -> bool:
    from normfree.nn.residual import SkipInitGain

    gains = [m.gain for m in model.modules() if isinstance(m, SkipInitGain)]
    return bool(gains) and all(float(g.detach()) == 0.0 for g in gains)


def _common(p: argparse.ArgumentParser, batch: int) -> None:
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="input height = width (default: the model's test size)")  # fmt: skip
    p.add_argument("--batch", type=positive_int, default=batch,
                   help=f"batch size (default {batch})")  # fmt: skip
    p.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="model option for every model, e.g. use_ws=False (repeatable)")  # fmt: skip
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the Gaussian input and the model")  # fmt: skip
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    add_trust_code_argument(p)
    add_trust_pickle_argument(p)
    p.add_argument(
        "--points",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="module names/globs to measure ('*' stays within a dotted component)",
    )
    p.add_argument(
        "--branch-points",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="last module of each residual branch, for non-normfree models",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "spp",
        help="signal propagation plots of one or more models",
        description="Signal Propagation Plots (Brock et al. 2021a) at init.",
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="registered name, NAME[key=value,...] or package.module:factory",
    )
    _common(p, batch=16)
    p.add_argument("--out", default=None, help="PNG file for the three-panel plot")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.add_argument("--csv", default=None, help="write the results as CSV")
    p.add_argument(
        "--skip-gains-one",
        action="store_true",
        help="set SkipInit gains to 1 for the measurement (the model is unchanged)",
    )
    p.add_argument(
        "--mode",
        choices=("train", "eval"),
        default="train",
        help="train: batch statistics (paper); eval: running statistics",
    )
    p.add_argument("--log-scale", action="store_true", help="log-scale y axes in the plot")
    p.add_argument("--quiet", action="store_true", help="do not print the tables")
    p.set_defaults(func=run_spp)

    d = sub.add_parser("diagnose", help="check a model for signal-propagation problems",
                       description="Mean shift, exploding/vanishing variance, residual branches "
                       "out of scale and batch dependence at initialisation. Exit code 1 when "
                       "a problem is found.")  # fmt: skip
    d.add_argument(
        "model",
        metavar="MODEL",
        help="registered name, NAME[key=value,...] or package.module:factory",
    )
    _common(d, batch=8)
    d.add_argument(
        "--keep-skip-gains",
        action="store_true",
        help="measure with the SkipInit gains as they are (default: set to 1)",
    )
    d.add_argument("--no-batch-check", action="store_true", help="skip the batch-dependence test")
    d.add_argument("--json", default=None, help="write the diagnosis as JSON")
    d.set_defaults(func=run_diagnose)


def _device(name: str) -> torch.device:
    from normfree.train.distributed import select_device

    return select_device(name, what="--device")


def run_spp(args: argparse.Namespace) -> int:
    from normfree.analysis.plots import check_figure_path, plot_spp
    from normfree.analysis.spp import save_results, signal_propagation, write_csv

    try:
        check_writable(args.json, args.csv, args.out)
        check_outputs(args.models, json=args.json, csv=args.csv, out=args.out)
        if args.out:  # before --json/--csv are written: a failing plot would leave them replaced
            check_figure_path(args.out)
        device = _device(args.device)
        overrides = parse_overrides(args.override)
        results = []
        for spec in args.models:
            torch.manual_seed(args.seed)
            model = model_from_spec(spec, overrides, trust_pickle=args.trust_pickle).to(device)
            if _zero_gains(model) and not args.skip_gains_one:
                print(
                    f"note: every SkipInit gain of {spec} is 0, so its blocks are identities "
                    "at init; pass --skip-gains-one to see the branches",
                    file=sys.stderr,
                )
            shape = _input_shape(model, spec, args.image_size)
            with model_input_errors(spec, (args.batch, *shape)):
                result = signal_propagation(
                    model, input_shape=shape, points=args.points,
                    branch_points=args.branch_points, batch_size=args.batch, seed=args.seed,
                    skip_gains_to_one=args.skip_gains_one, mode=args.mode, label=spec,
                )  # fmt: skip
            results.append(result)
            if not args.quiet:
                print(result.table())
        if args.json:
            save_results(results, args.json)
        if args.csv:
            write_csv(results, args.csv)
        if args.out:
            plot_spp(results, args.out, log_scale=args.log_scale)
            print(f"wrote {args.out}")
    except (ValueError, TypeError, KeyError, ImportError, OSError, CheckpointError) as err:
        return report_error(err)
    except RuntimeError as err:  # an input the machine cannot allocate (--image-size, --batch)
        return report_out_of_memory(err, "use a smaller --image-size or --batch")
    rc = 0
    for result in results:  # the files are written: they show where the NaNs start
        bad = result.config["non_finite_points"]
        if bad:
            rc = report_error(ValueError(
                f"{result.label} gives NaN or inf at {len(bad)} of {len(result)} points, from "
                f"{bad[0]} on; check its initialisation and overrides (normfree diagnose)"
            ), code=1)  # fmt: skip
    return rc


def run_diagnose(args: argparse.Namespace) -> int:
    from normfree.analysis.diagnose import diagnose

    try:
        check_writable(args.json)
        check_outputs([args.model], json=args.json)
        device = _device(args.device)
        torch.manual_seed(args.seed)
        overrides = parse_overrides(args.override)
        model = model_from_spec(args.model, overrides, trust_pickle=args.trust_pickle).to(device)
        shape = _input_shape(model, args.model, args.image_size)
        with model_input_errors(args.model, (args.batch, *shape)):
            result = diagnose(
                model, input_shape=shape, points=args.points, branch_points=args.branch_points,
                batch_size=args.batch, seed=args.seed, skip_gains_to_one=not args.keep_skip_gains,
                check_batch_dependence=not args.no_batch_check, label=args.model,
            )  # fmt: skip
        print(result.to_text())
        if args.json:
            result.to_json(args.json)
    except (ValueError, TypeError, KeyError, ImportError, OSError, CheckpointError) as err:
        return report_error(err)
    except RuntimeError as err:  # an input the machine cannot allocate (--image-size, --batch)
        return report_out_of_memory(err, "use a smaller --image-size or --batch")
    return result.exit_code
