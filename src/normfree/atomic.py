"""Atomic file writes, used for every checkpoint, result and record file normfree writes.

The content goes to a temporary file in the target's directory, is flushed and fsync'ed, and is
then renamed over the target (``os.replace`` is atomic on POSIX and Windows): a reader, or a run
interrupted mid-write, sees either the old file or the new one, never half of one. Files get the
mode a plain ``open`` would give them (``0o666`` less the process umask), not the ``0o600`` of
the temporary file. A failed write (disk full, read-only folder) raises an ``OSError`` whose
message names the target and says it was left as it was. A process killed mid-write leaves its
``.<name>.*.tmp`` behind; :func:`remove_stale_temp_files` clears them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_save_figure",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_writable",
    "file_mode",
    "overwritten_input",
    "remove_stale_temp_files",
    "same_file",
    "to_json",
]

_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # mkstemp(prefix=".<name>.", suffix=".tmp")


def _umask() -> int:
    """The process umask (read from /proc on Linux, else set-and-restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def _write_error(path: Path, e: OSError) -> OSError:
    what = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return OSError(e.errno, f"cannot write {path}: {what}; {path.name} was left as it was")


def _refuse_folder_name(given: str | os.PathLike[str]) -> None:
    """A path written with a trailing separator names a folder (``Path`` would drop it and
    write a file of the last name)."""
    if os.fspath(given).endswith(("/", os.sep)):
        raise OSError(
            errno.EISDIR, f"cannot write {os.fspath(given)}: it ends in a separator, so it names "
            "a folder; give a file name"
        )  # fmt: skip


def _is_stream(path: Path) -> bool:
    """An existing target that is neither a regular file nor a folder (links followed)."""
    return path.exists() and not path.is_file() and not path.is_dir()


def atomic_write_bytes(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fileobj)`` on a binary temporary file next to ``path``, fsync it, then rename
    it over ``path`` (parent folders are created). On any error the temporary file is removed
    and ``path`` is untouched. Returns ``path``.

    A ``path`` that exists and is not a regular file or a folder (a FIFO, ``/dev/null``,
    ``/dev/stdout``: a stream, where a partial write cannot be undone anyway) is written into
    directly: renaming over it would replace the device node or link with a plain file."""
    _refuse_folder_name(path)
    path = Path(path)
    if _is_stream(path):
        try:
            with open(path, "wb") as stream:
                write(stream)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX: mkstemp made it 0o600
                os.fchmod(f.fileno(), file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
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


def same_file(a: str | os.PathLike[str] | None, b: str | os.PathLike[str] | None) -> bool:
    """Whether two paths name one file: the same path once ``~`` and links are resolved, or two
    names of one existing file. ``None`` or ``""`` (an option not given) names no file. The
    commands check their outputs with it, so that one write cannot replace another output or
    an input."""
    if not a or not b:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.samefile(pb)
    return pa.resolve() == pb.resolve()


def overwritten_input(
    outputs: Sequence[tuple[str, str | os.PathLike[str] | None]],
    inputs: Sequence[tuple[str, str | os.PathLike[str] | None]],
) -> tuple[str, str, str, str] | None:
    """The first ``(output name, output, input name, input)`` where an output path names an
    existing input file (:func:`same_file`), inputs in order, each against every output; None
    where none does. ``outputs`` and ``inputs`` are ``(name, path)`` pairs (an option's flag
    and its value; a path not given is skipped). A command refuses such an output before it
    reads anything: writing it would destroy the input."""
    for in_name, given in inputs:
        if not given or not Path(given).is_file():
            continue
        for out_name, out in outputs:
            if same_file(out, given):
                return out_name, str(out), in_name, str(given)
    return None


def check_writable(*paths: str | os.PathLike[str] | None) -> None:
    """Fail early (``OSError`` naming the path) when :func:`atomic_write_bytes` could not write
    one of ``paths`` (``None`` entries, options not given, are skipped): creates (then removes)
    a temporary file in each folder, or in the nearest existing ancestor when the folder does
    not exist yet. Use it before a long computation whose results go to those paths."""
    for given in paths:
        if given is None:
            continue
        _refuse_folder_name(given)
        path = Path(given)
        if path.is_dir():
            raise OSError(errno.EISDIR, f"cannot write {path}: it is a folder")
        if _is_stream(path):  # written into directly (atomic_write_bytes)
            if not os.access(path, os.W_OK):
                raise OSError(errno.EACCES, f"cannot write {path}: permission denied")
            continue
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        os.close(fd)
        os.unlink(tmp)


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files an interrupted :func:`atomic_write_bytes` left directly
    in ``folder`` (only call it while no other process writes there). Returns what was removed."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if _TEMP_NAME.match(p.name) and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    return atomic_write_bytes(path, lambda f: f.write(data))


def _finite_only(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite_only(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_only(v) for v in data]
    return data


def to_json(data: Any, indent: int | None = None) -> str:
    """``json.dumps`` that writes valid JSON: a NaN or infinite number (a diverged loss, a best
    score never set) becomes ``null``, where Python would write ``NaN`` / ``-Infinity``."""
    return json.dumps(_finite_only(data), indent=indent, allow_nan=False)


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON (with a final newline, :func:`to_json`) to ``path``
    atomically. The JSON is produced before the file is touched, so unserializable data
    leaves ``path`` as it was."""
    return atomic_write_text(path, to_json(data, indent=2) + "\n")


def atomic_save_figure(fig: Any, path: str | os.PathLike[str], **savefig_kwargs: Any) -> Path:
    """``fig.savefig`` of a matplotlib figure to ``path`` atomically; the image format comes from
    the file suffix (PNG when there is none)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write_bytes(path, lambda f: fig.savefig(f, format=fmt, **savefig_kwargs))
