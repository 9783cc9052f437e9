"""The ``normfree`` command line. Thin over the Python API: every subcommand lives in the module
of its concern and registers itself through ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

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


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, as every other normfree error is (argparse
    prints the whole usage block first); subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="normfree",
        description="Build, analyse, train and deploy deep networks without batch normalization.",
    )
    parser.add_argument("--version", action="version", version=f"normfree {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for path in SUBCOMMANDS:
        importlib.import_module(path).add_parser(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` where options and ``KEY=VALUE`` overrides may come in any order:
    argparse gives a subcommand's ``overrides`` (``nargs="*"``) only the first run of
    positional words, so ``normfree train a=1 --compile b=2`` would refuse ``b=2``. The
    overrides left over are appended in command-line order (a later one still wins); anything
    else left over is refused as argparse does."""
    args, extra = parser.parse_known_args(argv)
    overrides = getattr(args, "overrides", None)
    if extra and isinstance(overrides, list):
        if all("=" in item and not item.startswith("-") for item in extra):
            overrides.extend(extra)
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The ``normfree`` command; Ctrl-C at any point after the package is imported (building
    the parser imports the commands' modules) ends it with one line and code 130."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    trusted = contextlib.nullcontext()
    if getattr(args, "trust_code", False):  # the commands' --trust-code
        from normfree.convert import trusting_code

        trusted = trusting_code()
    with trusted:
        return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
