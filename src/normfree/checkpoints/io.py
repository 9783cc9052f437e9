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
    "save_safetensors",
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


class _Inert:
    """What :class:`_GlobalsOnly` builds in place of every class or function a pickle names:
    it accepts any arguments, state and items, and does nothing with them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return self

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _GlobalsOnly(pickle.Unpickler):
    """An unpickler that records every global a pickle names (``find_class``, exact with any
    protocol and memoised strings) and builds :class:`_Inert` instead: nothing is imported,
    called or built from the file."""

    def __init__(self, f: Any) -> None:
        super().__init__(f)
        self.names: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        self.names.append(f"{module}.{name}")
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        return _Inert()


_LARGEST_INSPECTED = 64 << 20  # a raw pickle bigger than this is not read to name a global
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's pre-1.6 (non-zip) format
_LEGACY_PICKLES = 5  # magic, protocol, sys_info, the object, its storage keys; raw data follows


def _pickled_globals(path: str | os.PathLike[str]) -> tuple[bool, list[str]] | None:
    """Whether a non-zip file is in torch's legacy format, and the globals (``module.name``) its
    pickles name: every pickle of that format, or the one pickle of a raw pickle file. None
    when a pickle ends early or is not one (the file is truncated or corrupt), or a raw pickle
    is too big to inspect."""
    try:
        with open(path, "rb") as f:
            unpickler = _GlobalsOnly(f)
            legacy = unpickler.load() == _LEGACY_MAGIC
            if legacy:
                for _ in range(_LEGACY_PICKLES - 1):
                    unpickler.load()
            elif os.path.getsize(path) > _LARGEST_INSPECTED:
                return None
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
    found = _pickled_globals(path)
    if found is None or not found[1]:
        return None
    legacy, names = found
    named = re.search(r"GLOBAL ([\w.]+)", str(e))
    if named and named.group(1) in names:
        return f"it names {named.group(1)}"
    foreign = [n for n in names if not (legacy and _written_by_torch_save(n))]
    return f"it names {foreign[0]}" if foreign else "objects the safe loader does not read"


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (PyTorch's load errors run over several lines)."""
    first = first_line(e)
    if not first and isinstance(e, EOFError):
        first = "the file ends early"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load_torch_file(
    path: str | os.PathLike[str], map_location: Any = "cpu", *, mmap: bool = False,
    trust_hint: str | None = None,
) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors.

    Raises :class:`CheckpointError` naming ``path`` and what to do: for a truncated or corrupt
    file, and for one whose pickle holds more than tensors and plain containers (which could
    run code when unpickled: normfree refuses it, says what it holds, and names ``trust_hint``,
    the caller's explicit opt-in, where there is one). PyTorch's warning about an unusual pickle
    protocol is not shown; the file loads or is refused all the same.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
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
        raise CheckpointError(f"checkpoint not found: {path}")
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
