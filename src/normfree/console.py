"""The one-line error every ``normfree`` subcommand prints before it exits non-zero.

A command reports bad input as ``error: <what is wrong and what to do>`` on stderr, with no
traceback. :func:`report_error` is that line for any exception the command expects (its
``cli_message`` where it has one): an
``OSError``'s text without its ``[Errno N]`` prefix; a message of several lines joined into one,
except a worker process's traceback text, of which the last line (its error) is kept.
"""

from __future__ import annotations

import sys

__all__ = ["error_line", "first_line", "name_list", "report_error", "yaml_problem"]


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (``""`` for none): library errors such as PyTorch's
    run over several lines around it."""
    return (str(e).strip().splitlines() or [""])[0]


def name_list(names: list[str], limit: int = 12) -> str:
    """``a, b, c, … (+n)``: at most ``limit`` names of a long list, in a message."""
    shown = ", ".join(names[:limit])
    return shown + (f", … (+{len(names) - limit})" if len(names) > limit else "")


def error_line(e: BaseException) -> str:
    """The message of ``e`` as one line (see the module docstring); an exception whose advice
    differs on a command line carries that text as ``cli_message``."""
    if isinstance(e, OSError) and e.strerror:
        names = " -> ".join(str(n) for n in (e.filename, e.filename2) if n is not None)
        return f"{e.strerror}: {names}" if names else e.strerror
    text = str(getattr(e, "cli_message", None) or e).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if "Traceback (most recent call last)" in text:  # a worker's traceback: its error is last
        return lines[-1]
    return " ".join(lines)  # a message with detail lines (e.g. a checkpoint mismatch) in one


def yaml_problem(e: BaseException) -> str:
    """A PyYAML error (``yaml.YAMLError``) in one line: the problem and where it is (PyYAML's own
    message spans several lines, with the offending text and a caret)."""
    problem = str(getattr(e, "problem", None) or "").strip() or error_line(e)
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def report_error(e: BaseException, code: int = 2) -> int:
    """Print ``error: <one line>`` for ``e`` on stderr and return ``code`` (the exit status)."""
    print(f"error: {error_line(e)}", file=sys.stderr)
    return code
