"""``normfree models``: list registered models with their size and default resolutions."""

from __future__ import annotations

import argparse

from normfree.console import report_error

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch pattern, e.g. 'nfnet_*'")
    p.add_argument("--params", action="store_true", help="also build each model and count params")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from normfree.models import create_model, list_models

    names = list_models(args.pattern)
    for name in names:
        if args.params:
            model = create_model(name)
            n = sum(p.numel() for p in model.parameters())
            m = model.meta
            print(f"{name:32s} {n / 1e6:9.2f}M  train {m.train_size:4d}px  test {m.test_size:4d}px")
        else:
            print(name)
    if not names:
        return report_error(
            LookupError(f"no model matches {args.pattern!r} (an fnmatch pattern, case-sensitive, "
                        "e.g. 'nf_resnet*'; `normfree models` lists all)"), 1
        )  # fmt: skip
    return 0
