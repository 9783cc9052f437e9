"""The one-line error every ``normfree`` subcommand prints before it exits non-zero.

A command reports bad input as ``error: <what is wrong and what to do>`` on stderr, with no
traceback. :func:`report_error` is that line for any exception the command expects: an
``OSError``'s text without its ``[Errno N]`` prefix, and of a message spanning several lines (a
worker process's traceback text) the last line, where its error is.
"""

from __future__ import annotations

import sys

__all__ = ["error_line", "report_error"]


def error_line(e: BaseException) -> str:
    """The message of ``e`` as one line (see the module docstring)."""
    if isinstance(e, OSError) and e.strerror:
        names = " -> ".join(str(n) for n in (e.filename, e.filename2) if n is not None)
        return f"{e.strerror}: {names}" if names else e.strerror
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def report_error(e: BaseException, code: int = 2) -> int:
    """Print ``error: <one line>`` for ``e`` on stderr and return ``code`` (the exit status)."""
    print(f"error: {error_line(e)}", file=sys.stderr)
    return code
