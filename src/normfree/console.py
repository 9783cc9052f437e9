"""The one-line error every ``normfree`` subcommand prints before it exits non-zero.

A command reports bad input as ``error: <what is wrong and what to do>`` on stderr, with no
traceback. :func:`report_error` is that line for any exception the command expects (its
``cli_message`` where it has one): an
``OSError``'s text without its ``[Errno N]`` prefix; a message of several lines joined into one,
except a worker process's traceback text, of which the last line (its error) is kept.
"""

from __future__ import annotations

import re
import sys

__all__ = [
    "error_line", "first_line", "name_list", "out_of_memory", "report_error",
    "report_out_of_memory", "with_article", "yaml_problem",
]  # fmt: skip

# PyTorch's CPU allocator and CUDA's messages for an allocation the machine cannot serve
_OOM_MARKERS = ("DefaultCPUAllocator", "out of memory", "can't allocate memory",
                "not enough memory")  # fmt: skip
# the last line of a worker's traceback: ``package.module.SomeError: message``
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b:\s*")


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (``""`` for none): library errors such as PyTorch's
    run over several lines around it."""
    return (str(e).strip().splitlines() or [""])[0]


def name_list(names: list[str], limit: int = 12) -> str:
    """``a, b, c, … (+n)``: at most ``limit`` names of a long list, in a message."""
    shown = ", ".join(names[:limit])
    return shown + (f", … (+{len(names) - limit})" if len(names) > limit else "")


def with_article(word: str) -> str:
    """``word`` after its indefinite article, as a message names a type: ``"a tuple"``,
    ``"an int"`` (by the first letter's spelling)."""
    return f"{'an' if word and word[0].lower() in 'aeiou' else 'a'} {word}"


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
        last = lines[-1]
        raised = _RAISED.match(last)
        if raised is None:
            return last
        message = last[raised.end():]
        if message and message[0] not in "'\"":
            return message
        # a bare repr (KeyError: 'label') says nothing without its class: keep the class
        return f"{raised.group(0).split(':')[0].rsplit('.', 1)[-1]}: {message}".rstrip(": ")
    return " ".join(lines)  # a message with detail lines (e.g. a checkpoint mismatch) in one


def out_of_memory(e: BaseException, fix: str) -> str | None:
    """The one-line message of an allocation failure (PyTorch's CPU allocator, CUDA out of
    memory), naming the size asked for and ``fix``; None for any other error."""
    text = str(e)
    if not isinstance(e, RuntimeError) or not any(m in text for m in _OOM_MARKERS):
        return None
    size = ""
    found = re.search(r"allocate (\d+) bytes", text)
    if found:
        size = f" ({int(found.group(1)) / 2**30:.1f} GiB asked for)"
    else:
        found = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", text)
        size = f" ({found.group(1)} asked for)" if found else ""
    return f"out of memory{size}: {fix}"


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


def report_out_of_memory(e: RuntimeError, fix: str, code: int = 2) -> int:
    """:func:`report_error` of an allocation failure (:func:`out_of_memory`); any other
    ``RuntimeError`` is raised again, as a bug with its traceback."""
    message = out_of_memory(e, fix)
    if message is None:
        raise e
    return report_error(RuntimeError(message), code)
