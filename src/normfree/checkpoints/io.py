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


class _Named(Exception):
    """Raised by :class:`_FirstGlobal` with the first global a pickle names."""


class _FirstGlobal(pickle.Unpickler):
    """An unpickler that stops at the first global the pickle names (``find_class`` is where
    anything would be imported; nothing is imported, called or built from a class)."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Named(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent id")


_LARGEST_INSPECTED = 64 << 20  # a refused pickle bigger than this is not read to name a global


def _first_global(path: str | os.PathLike[str]) -> str | None:
    """The first global (``module.name``) a plain pickle file names; ``""`` when it names none
    or is too big to inspect; None when the file is not a pickle."""
    if os.path.getsize(path) > _LARGEST_INSPECTED:
        return ""
    try:
        with open(path, "rb") as f:
            _FirstGlobal(f).load()
    except _Named as named:
        return str(named)
    except Exception:
        return None
    return ""


def _refusal_reason(e: BaseException, path: str | os.PathLike[str]) -> str | None:
    """What ``torch.load(weights_only=True)`` refused in the file (``it names posix.system``), or
    None when ``e`` is not such a refusal (a corrupt file also fails the safe unpickler, with
    "Unsupported operand": then :class:`_FirstGlobal` reads it up to its first global).
    PyTorch's message spans several lines around the reason, with advice (``weights_only=False``)
    normfree does not follow."""
    text = str(e)
    if not isinstance(e, pickle.UnpicklingError) or not text.startswith("Weights only load"):
        return None
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return f"it names {named.group(1)}"
    if "Unsupported operand" in text and not zipfile.is_zipfile(path):
        name = _first_global(path)
        if name is None:
            return None
        if name:
            return f"it names {name}"
    return "objects the safe loader does not read"


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (PyTorch's load errors run over several lines)."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


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
            fix = f", or pass {trust_hint} if you trust where it came from" if trust_hint else ""
            raise UnsafePickleError(
                f"{path} holds pickled Python objects, not only tensors ({reason}), and normfree "
                "does not unpickle those because they can run code; save the weights with "
                f"torch.save(model.state_dict(), ...) or as .safetensors{fix}"
            ) from e
        if str(e).startswith("Weights only load"):  # neither a torch zip file nor a pickle
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
