"""Errors raised when reading checkpoints."""

from __future__ import annotations

from normfree.console import name_list

__all__ = ["CheckpointError", "CheckpointMismatchError", "UnsafePickleError"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, of an unknown format, or refused for safety."""


class UnsafePickleError(CheckpointError):
    """A file holds pickled Python objects beyond tensors (unpickling it could run code): refused
    unless the caller opts in to full unpickling for files it trusts.

    ``path`` is the file, ``reason`` what it holds (``it names posix.system``) and ``opt_in`` the
    caller's explicit opt-in named in the message (None: there is none)."""

    def __init__(self, path: str, reason: str, opt_in: str | None = None) -> None:
        self.path, self.reason, self.opt_in = path, reason, opt_in
        fix = f", or pass {opt_in} if you trust where it came from" if opt_in else ""
        super().__init__(
            f"{path} holds pickled Python objects, not only tensors ({reason}), and normfree does "
            "not unpickle those because they can run code; save the weights with "
            f"torch.save(model.state_dict(), ...) or as .safetensors{fix}"
        )

    def with_opt_in(self, opt_in: str) -> UnsafePickleError:
        """The same refusal, naming ``opt_in`` (for a caller that offers one)."""
        return UnsafePickleError(self.path, self.reason, opt_in)


_PYTHON_ADVICE = "pass strict=False to load the matching parameters only"
_CLI_ADVICE = "build the model the file was saved from, with its options (e.g. num_classes)"


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's parameters don't match the model. Lists every difference.

    The message advises ``strict=False``; ``cli_message`` is the same text with the advice a
    command line can follow (the commands load strictly), which
    :func:`normfree.console.error_line` prints."""

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
        self.differences = sorted([*missing, *unexpected, *(k for k, _, _ in mismatched)])
        lines = [f"{source} does not match the model (nothing was loaded; {_PYTHON_ADVICE}):"]
        if missing:
            lines.append(f"  missing in checkpoint ({len(missing)}): {name_list(missing)}")
        if unexpected:
            lines.append(f"  unexpected in checkpoint ({len(unexpected)}): {name_list(unexpected)}")
        for name, want, got in mismatched[:20]:
            lines.append(f"  shape mismatch: {name}: model {list(want)} vs checkpoint {list(got)}")
        if len(mismatched) > 20:
            lines.append(f"  … and {len(mismatched) - 20} more shape mismatches")
        message = "\n".join(lines)
        self.cli_message = message.replace(_PYTHON_ADVICE, _CLI_ADVICE, 1)
        super().__init__(message)

