"""Safe, atomic reading and writing of tensor files.

Writes go through :func:`normfree.atomic.atomic_write_bytes` (temporary file, fsync, rename), so a
crash never leaves a half-written checkpoint behind. Reads use ``torch.load(weights_only=True)``
(no arbitrary code) or safetensors.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from normfree.atomic import atomic_write_bytes
from normfree.checkpoints.errors import CheckpointError, UnsafePickleError
from normfree.console import first_line

__all__ = [
    "atomic_save", "atomic_write_bytes", "load_tensors", "load_torch_file", "load_trusted_pickle",
    "missing_file_message", "safetensors_metadata", "save_safetensors",
]  # fmt: skip


def _torch_save(obj: Any, f: Any) -> None:
    """``torch.save`` that reports a failed write as the ``OSError`` behind it: on a full disk
    PyTorch's writer raises ``RuntimeError: unexpected pos`` with the ``OSError`` as context."""
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, OSError):
            raise cause from e
        raise


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` atomically (see module docstring). A failed write (disk full)
    raises ``OSError`` naming ``path``, which keeps its previous content."""
    atomic_write_bytes(path, lambda f: _torch_save(obj, f))


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically (needs ``pip install "normfree[safetensors]"``)."""
    try:
        from safetensors.torch import save
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('safetensors is needed: pip install "normfree[safetensors]"') from e
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, lambda f: f.write(data))


class _InertType(type):
    """The type of :data:`_INERT`, the one object :class:`_GlobalsOnly` builds in place of
    every class, function and object a pickle names or makes: it is a class (a pickle may use
    anything it built as the class of a ``NEWOBJ``), and calling it, building it from state or
    giving it items does nothing and gives :data:`_INERT` again."""

    def __call__(cls, *args: Any, **kwargs: Any) -> type:
        return cls

    def __setstate__(cls, state: Any) -> None:
        pass

    def __setitem__(cls, key: Any, value: Any) -> None:
        pass

    def append(cls, item: Any) -> None:
        pass

    def extend(cls, items: Any) -> None:
        pass


_INERT = _InertType("_Inert", (), {"__new__": lambda cls, *args, **kwargs: cls})


class _GlobalsOnly(pickle.Unpickler):
    """An unpickler that records every global a pickle names (``find_class``, exact with any
    protocol and memoised strings) and builds :data:`_INERT` instead: nothing is imported,
    called or built from the file."""

    def __init__(self, f: Any) -> None:
        super().__init__(f)
        self.names: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        self.names.append(f"{module}.{name}")
        return _INERT

    def persistent_load(self, pid: Any) -> Any:
        return _INERT


_LARGEST_INSPECTED = 64 << 20  # a raw pickle bigger than this is not read to name a global
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's pre-1.6 (non-zip) format
_LEGACY_PICKLES = 5  # magic, protocol, sys_info, the object, its storage keys; raw data follows


def _head(path: str | os.PathLike[str], size: int = 24) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _is_legacy(head: bytes) -> bool:
    """The first pickle of torch's legacy format: PROTO, (at protocol 4 and up a FRAME), then
    the 10-byte magic number."""
    start = 11 if head[2:3] == b"\x95" else 2  # FRAME: its opcode and an 8-byte length
    return head[:1] == b"\x80" and head[start : start + 2] == b"\x8a\x0a"


def _pickled_globals(path: str | os.PathLike[str]) -> tuple[bool, list[str]] | None:
    """Whether a non-zip file is in torch's legacy format, and the globals (``module.name``) its
    pickles name: every pickle of that format, or the one pickle of a raw pickle file. None
    when a pickle ends early or is not one (the file is truncated or corrupt), or a raw pickle
    is too big to inspect (its size is checked before anything is read)."""
    try:
        if not _is_legacy(_head(path)) and os.path.getsize(path) > _LARGEST_INSPECTED:
            return None
        with open(path, "rb") as f:
            unpickler = _GlobalsOnly(f)
            legacy = unpickler.load() == _LEGACY_MAGIC
            if legacy:
                for _ in range(_LEGACY_PICKLES - 1):
                    unpickler.load()
    except Exception:
        return None
    return legacy, unpickler.names


def _archived_globals(path: str | os.PathLike[str]) -> list[str]:
    """The globals a torch zip file's pickle names, in the order it names them (as far as it
    can be read)."""
    unpickler = None
    try:
        with zipfile.ZipFile(path) as archive:
            member = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            if archive.getinfo(member).file_size > _LARGEST_INSPECTED:
                return []
            with archive.open(member) as f:
                unpickler = _GlobalsOnly(f)
                unpickler.load()
    except Exception:
        pass
    return unpickler.names if unpickler is not None else []


def _written_by_torch_save(name: str) -> bool:
    """A global ``torch.save`` itself writes for tensors and state dicts."""
    return name.startswith("torch.") or name == "collections.OrderedDict"


def _refusal_reason(e: BaseException, path: str | os.PathLike[str]) -> str | None:
    """What the safe loader refused in the file (``it names posix.system``), or None when the
    file is not refused for what it holds but truncated, corrupt or not a PyTorch file.

    A zip file (PyTorch's format since 1.6) is asked with the platform's own static check,
    ``torch.serialization.get_unsafe_globals_in_checkpoint``. Other files are read with
    :class:`_GlobalsOnly` after a refusal (``pickle.UnpicklingError``): a pickle that ends early
    is a truncated file, not an unsafe one; a whole one is named by the global PyTorch's
    message names where the file does name it, else by its first global that ``torch.save``
    would not write (a raw pickle: its first global)."""
    if zipfile.is_zipfile(path):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:
            return None
        if not unsafe:
            return None
        in_order = [n for n in _archived_globals(path) if n in unsafe] or sorted(unsafe)
        return f"it names {in_order[0]}"
    if not isinstance(e, pickle.UnpicklingError):
        return None
    named = re.search(r"GLOBAL ([\w.]+)", str(e))  # what PyTorch's loader refused, if it says
    found = _pickled_globals(path)
    if found is None:  # (a truncated file's message may name a clipped global: not trusted)
        if _head(path)[:1] == b"\x80" and os.path.getsize(path) > _LARGEST_INSPECTED:
            return "it is a pickle written by pickle.dump or another tool, not by torch.save"
        return None
    if not found[1]:
        return None
    legacy, names = found
    if named and named.group(1) in names:
        return f"it names {named.group(1)}"
    foreign = [n for n in names if not _written_by_torch_save(n)]
    if foreign:
        return f"it names {foreign[0]}"
    if not legacy:  # tensors pickled by pickle.dump: their storages need full unpickling
        return "it is a pickle.dump of tensors, not a torch.save file"
    return "objects the safe loader does not read"


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (PyTorch's load errors run over several lines)."""
    first = first_line(e)
    if not first and isinstance(e, EOFError):
        first = "the file ends early"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _pickle_protocol(path: str | os.PathLike[str]) -> int:
    """The pickle protocol of a torch file (its zip archive's ``data.pkl`` or, in the legacy
    and raw forms, the file itself); 0 when unknown."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
                with archive.open(member) as f:
                    head = f.read(2)
        else:
            head = _head(path, 2)
    except Exception:
        return 0
    return head[1] if len(head) == 2 and head[:1] == b"\x80" else 0


def _check_crcs(path: str | os.PathLike[str]) -> None:
    """A torch zip file whose records do not match their CRC-32 is corrupt (PyTorch's reader
    does not check them: a flipped byte in a tensor's record loads as a wrong value)."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError):
        return  # unreadable as a zip: torch.load's own error says so
    if bad is not None:
        raise CheckpointError(
            f"{path} is corrupt: its record {bad} does not match its checksum; restore it from "
            "a copy or give another file"
        )


def missing_file_message(path: str | os.PathLike[str]) -> str:
    """``checkpoint not found: PATH``, or for a folder which file to give instead."""
    if Path(path).is_dir():
        return (
            f"{path} is a folder, not a weights file: give a file in it (a training run keeps "
            "best.pt and last.pt)"
        )
    return f"checkpoint not found: {path}"


def load_torch_file(
    path: str | os.PathLike[str], map_location: Any = "cpu", *, mmap: bool = False,
    trust_hint: str | None = None,
) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors, after checking the zip
    records' CRC-32 (not with ``mmap``, which reads the structure only).

    Raises :class:`CheckpointError` naming ``path`` and what to do: for a truncated or corrupt
    file, and for one whose pickle holds more than tensors and plain containers (which could
    run code when unpickled: normfree refuses it, says what it holds, and names ``trust_hint``,
    the caller's explicit opt-in, where there is one). PyTorch's warning about an unusual pickle
    protocol is not shown; the file loads or is refused all the same.
    """
    if not mmap:  # (a memory-mapped load reads the structure, not the tensors' records)
        _check_crcs(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        protocol = _pickle_protocol(path)
        saved_by_torch = zipfile.is_zipfile(path) or _is_legacy(_head(path))
        if protocol >= 4 and saved_by_torch and "Unsupported operand" in str(e):
            raise CheckpointError(
                f"{path} was written with pickle protocol {protocol} (torch.save(..., "
                f"pickle_protocol={protocol})), which PyTorch's safe loader (torch.load with "
                "weights_only=True) cannot read; save it again with torch.save's default "
                "protocol, or as .safetensors"
            ) from e
        reason = _refusal_reason(e, path)
        if reason is not None:
            raise UnsafePickleError(str(path), reason, trust_hint) from e
        if isinstance(e, pickle.UnpicklingError):  # neither a torch zip file nor a pickle
            first = "no tensors or pickle could be read from it"
        else:
            first = _first_line(e)
        raise CheckpointError(
            f"{path} is corrupt or truncated, or not a PyTorch file, and cannot be loaded "
            f"({first}); restore it from a copy or give another file"
        ) from e


def load_trusted_pickle(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=False)``: full unpickling, which can run code. Only for
    a file the user vouched for (``--trust-pickle`` / ``trust_pickle=True``) after the safe
    loader refused it (:class:`UnsafePickleError`); a file that still cannot be read raises
    :class:`CheckpointError` in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # EOFError, UnpicklingError, an import the pickle names failing...
        raise CheckpointError(
            f"{path} cannot be unpickled even as trusted ({_first_line(e)}); it is corrupt, "
            "truncated or needs code that is not installed"
        ) from e


def load_tensors(path: str | os.PathLike[str], *, trust_hint: str | None = None) -> Any:
    """Load a ``.safetensors`` file or a torch file with ``weights_only=True``.

    Raises :class:`CheckpointError` for a missing, truncated or corrupt file, or one that needs
    full unpickling (which normfree never does for torch files; ``trust_hint`` as in
    :func:`load_torch_file`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(missing_file_message(path))
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover
            raise ImportError('safetensors is needed: pip install "normfree[safetensors]"') from e
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"corrupt safetensors file {path}: {e}") from e
    return load_torch_file(path, trust_hint=trust_hint)


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file's header (``{}`` when it has none), read
    without loading its tensors (:func:`save_model` records ``format`` and ``model_name``)."""
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('safetensors is needed: pip install "normfree[safetensors]"') from e
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"corrupt safetensors file {path}: {e}") from e
