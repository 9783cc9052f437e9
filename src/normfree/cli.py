"""The ``normfree`` command line. Thin over the Python API: every subcommand lives in the module
of its concern and registers itself through ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from normfree._version import __version__

__all__ = ["build_parser", "main"]

# module path of each subcommand; each module defines add_parser(subparsers) -> None,
# whose parser sets ``func`` (args -> exit code).
SUBCOMMANDS: list[str] = [
    "normfree.models.cli",
    "normfree.analysis.cli",
    "normfree.train.cli",
    "normfree.deploy.cli",
    "normfree.convert.cli",
    "normfree.experiments.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normfree",
        description="Build, analyse, train and deploy deep networks without batch normalization.",
    )
    parser.add_argument("--version", action="version", version=f"normfree {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for path in SUBCOMMANDS:
        importlib.import_module(path).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
