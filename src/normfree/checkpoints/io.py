"""Safe, atomic reading and writing of tensor files.

Writes go through :func:`normfree.atomic.atomic_write_bytes` (temporary file, fsync, rename), so a
crash never leaves a half-written checkpoint behind. Reads use ``torch.load(weights_only=True)``
(no arbitrary code) or safetensors.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from normfree.atomic import atomic_write_bytes
from normfree.checkpoints.errors import CheckpointError

__all__ = ["atomic_save", "atomic_write_bytes", "load_tensors", "save_safetensors"]


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


def load_tensors(path: str | os.PathLike[str]) -> Any:
    """Load a ``.safetensors`` file or a torch file with ``weights_only=True``.

    Raises :class:`CheckpointError` for a missing, truncated or corrupt file, or one that needs
    full unpickling (which normfree never does for torch files).
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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {e}") from e
    except Exception as e:  # UnpicklingError for weights_only refusals
        raise CheckpointError(
            f"{path} is not a plain tensor checkpoint (torch.load with weights_only=True refused "
            f"it: {e}). normfree does not unpickle arbitrary objects from files."
        ) from e
