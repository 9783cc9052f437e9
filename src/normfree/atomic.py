"""Atomic file writes, used for every checkpoint, result and record file normfree writes.

The content goes to a temporary file in the target's directory, is flushed and fsync'ed, and is
then renamed over the target (``os.replace`` is atomic on POSIX and Windows): a reader, or a run
interrupted mid-write, sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_save_figure", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def atomic_write_bytes(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fileobj)`` on a binary temporary file next to ``path``, fsync it, then rename
    it over ``path`` (parent folders are created). On any error the temporary file is removed
    and ``path`` is untouched. Returns ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # persist the rename itself
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    return atomic_write_bytes(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON (with a final newline) to ``path`` atomically. The JSON is
    produced before the file is touched, so unserializable data leaves ``path`` as it was."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_save_figure(fig: Any, path: str | os.PathLike[str], **savefig_kwargs: Any) -> Path:
    """``fig.savefig`` of a matplotlib figure to ``path`` atomically; the image format comes from
    the file suffix (PNG when there is none)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write_bytes(path, lambda f: fig.savefig(f, format=fmt, **savefig_kwargs))
