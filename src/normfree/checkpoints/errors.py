"""Errors raised when reading checkpoints."""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointMismatchError", "UnsafePickleError"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, of an unknown format, or refused for safety."""


class UnsafePickleError(CheckpointError):
    """A file holds pickled Python objects beyond tensors (unpickling it could run code): refused
    unless the caller opts in to full unpickling for files it trusts."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's parameters don't match the model. Lists every difference."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        source: str = "checkpoint",
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        lines = [f"{source} does not match the model (nothing was loaded; pass strict=False "
                 "to load the matching parameters only):"]
        if missing:
            lines.append(f"  missing in checkpoint ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected in checkpoint ({len(unexpected)}): {_short(unexpected)}")
        for name, want, got in mismatched[:20]:
            lines.append(f"  shape mismatch: {name}: model {list(want)} vs checkpoint {list(got)}")
        if len(mismatched) > 20:
            lines.append(f"  … and {len(mismatched) - 20} more shape mismatches")
        super().__init__("\n".join(lines))


def _short(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … (+{len(names) - limit})" if len(names) > limit else "")
