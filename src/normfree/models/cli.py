"""``normfree models``: list registered models with their size and default resolutions."""

from __future__ import annotations

import argparse
import os
import sys

from normfree.console import report_error

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models")
    p.add_argument(
        "pattern", nargs="*", default=[],
        help="fnmatch patterns, e.g. 'nfnet_*' (a name matching any of them is listed)",
    )  # fmt: skip
    p.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="leave out the names matching PATTERN (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--params", action="store_true",
        help="also count each model's parameters (built on the meta device: no memory, no init)",
    )  # fmt: skip
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from normfree.models import create_model, list_models

    names = list_models(args.pattern, exclude_filters=args.exclude)
    if not names:
        asked = " ".join(repr(p) for p in args.pattern) or "'*'"
        without = f" without {' '.join(repr(p) for p in args.exclude)}" if args.exclude else ""
        return report_error(
            LookupError(f"no model matches {asked}{without} (fnmatch patterns, case-sensitive, "
                        "e.g. 'nf_resnet*'; `normfree models` lists all)"), 1
        )  # fmt: skip
    try:
        for name in names:
            if args.params:
                # shapes only: the largest models (NFNet-F7+, 830M parameters) would otherwise
                # allocate and initialise gigabytes each
                model = create_model(name, device="meta")
                n = sum(p.numel() for p in model.parameters())
                m = model.meta
                sizes = f"train {m.train_size:4d}px  test {m.test_size:4d}px"
                print(f"{name:32s} {n / 1e6:9.2f}M  {sizes}", flush=True)
            else:
                print(name)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`normfree models --params | head -3`)
        _silence_stdout()
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush into a closed pipe does
    not print a second error (Python's documented SIGPIPE recipe)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured output)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
