"""``normfree experiment NAME [--quick] [--out DIR] [--data SPEC] [--seeds N] [--jobs N]`` and
``normfree experiment --list``: run one of the papers' training claims as a resumable grid."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from normfree.console import report_error

__all__ = ["add_parser", "run_cli"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment",
        help="reproduce a paper's training claim (grid, table, figure)",
        description="Run an experiment: a grid of training runs (model × setting × seed) over "
        "the trainer. Finished cells are kept and skipped when the command is rerun. Writes "
        "OUT/results.csv, OUT/results.json and OUT/NAME.png. See docs/experiments.md.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="experiment (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments and their claims")
    p.add_argument("--quick", action="store_true",
                   help="the small variant (about a minute; what the tests run)")  # fmt: skip
    p.add_argument("--out", default=None,
                   help="experiment folder (default: experiments/NAME[-quick])")  # fmt: skip
    p.add_argument("--data", default=None,
                   help="dataset spec instead of the experiment's default, e.g. "
                   "cifar10:/path/to/cifar-10-batches-py or imagefolder:/dir")  # fmt: skip
    p.add_argument("--seeds", type=int, default=1, help="seeds per grid point (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per cell")
    p.add_argument("--report", action="store_true",
                   help="run nothing: write the table and figure of the cells finished so far "
                   "(safe while the grid runs in another process)")  # fmt: skip
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from normfree.experiments.catalog import BUILTIN
    from normfree.experiments.grid import (
        ExperimentError,
        GridOptions,
        default_out,
        get_experiment,
        run_experiment,
    )

    if args.list:
        for exp in BUILTIN:
            print(f"{exp.name:12s} {exp.claim}")
        return 0
    if not args.name:
        print("error: name an experiment (normfree experiment --list)", file=sys.stderr)
        return 2
    try:
        exp = get_experiment(args.name)
        for flag in ("seeds", "jobs", "threads"):
            if getattr(args, flag) < 1:
                raise ExperimentError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        cores = os.cpu_count() or 1
        if args.threads > cores:  # thousands of threads crash the OpenMP runtime
            raise ExperimentError(f"--threads must be at most the {cores} CPU cores of this "
                                  f"machine, got {args.threads}")  # fmt: skip
        if args.data is not None:
            _check_data(args.data)
        if args.out is not None and not args.out.strip():
            raise ExperimentError("--out is empty: name a folder, or leave it out for the default")
        given = None if args.data == exp.default_data else args.data  # the default, named
        options = GridOptions(quick=args.quick, data=given, seeds=args.seeds,
                              threads=args.threads)  # fmt: skip
        out = Path(args.out) if args.out else default_out(exp.name, args.quick)
        data = args.data or exp.default_data or "none (Gaussian input)"
        print(f"experiment {exp.name}: {exp.claim}\n  data {data}, folder {out}")
        if args.report and not (out / "cells").is_dir():
            raise ExperimentError(f"--report: no experiment folder at {out}")
        run_experiment(exp, out, options, jobs=args.jobs, report_only=args.report,
                       log=lambda line: print(line, flush=True))  # fmt: skip
    except (ExperimentError, OSError) as e:  # OSError: a folder or file that cannot be written
        return report_error(e)
    return 0


def _check_data(spec: str) -> None:
    """Fail before any cell runs when ``--data`` cannot be loaded (one line, no traceback)."""
    from normfree.data import build_datasets
    from normfree.experiments.grid import ExperimentError

    try:
        bundle = build_datasets(spec)
    except (OSError, ValueError, ImportError, TypeError) as e:
        raise ExperimentError(f"--data {spec!r}: {e}") from None
    for split, name in ((bundle.train, "training"), (bundle.val, "held-out")):
        if len(split) == 0:  # every cell would fail on it
            raise ExperimentError(f"--data {spec!r}: its {name} split holds no images; give a "
                                  "dataset with more images per class")  # fmt: skip
