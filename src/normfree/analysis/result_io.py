"""JSON persistence shared by the analysis result classes (SPP, moments, power)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from normfree.atomic import atomic_write_json

__all__ = ["JsonResult", "from_fields", "read_json"]

T = TypeVar("T")


def from_fields(cls: type[T], data: Mapping[str, Any]) -> T:
    """``cls(**data)`` for a result dataclass read from JSON, with ``null`` in a field typed
    ``float`` read back as NaN: :func:`normfree.atomic.to_json` writes every non-finite number
    as ``null`` (strict JSON), and a result that went NaN is still a result to print and plot.
    (An infinity reads back as NaN too.)"""
    floats = {f.name for f in dataclasses.fields(cls) if f.type in ("float", float)}  # type: ignore[arg-type]
    return cls(**{k: math.nan if v is None and k in floats else v for k, v in data.items()})


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
