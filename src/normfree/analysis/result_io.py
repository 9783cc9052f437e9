"""JSON persistence shared by the analysis result classes (SPP, moments, power)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from normfree.atomic import atomic_write_json

__all__ = ["JsonResult", "read_json"]


def read_json(path: str | Path) -> Any:
    """Parse a JSON file, with an error that names the file when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no such result file: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


class JsonResult:
    """Mixin for result classes that define ``to_dict()`` and ``from_dict(data)``: ``to_json``
    writes atomically (floats round-trip exactly), ``from_json`` reads back."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def to_json(self, path: str | Path) -> Path:
        """Write the result as indented JSON to ``path`` (atomically)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> Any:
        """Read a file written by :meth:`to_json`."""
        return cls.from_dict(read_json(path))
