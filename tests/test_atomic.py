"""Atomic writes: the target is either the old file or the new one, never a partial one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from normfree.atomic import (
    atomic_save_figure,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_text_and_json_round_trip_and_create_parents(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "a" / "b" / "x.txt", "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    data = {"x": 0.1 + 0.2, "y": [1, 2, None]}
    atomic_write_json(tmp_path / "r.json", data)
    assert json.loads((tmp_path / "r.json").read_text()) == data  # floats round-trip exactly


def test_failed_write_keeps_old_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})

    def half_then_fail(f) -> None:
        f.write(b'{"partial": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, half_then_fail)
    assert json.loads(path.read_text()) == {"ok": 1}
    assert _leftovers(tmp_path) == []


def test_figure_is_written_in_the_suffix_format(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = atomic_save_figure(fig, tmp_path / "f.png", dpi=50)
    svg = atomic_save_figure(fig, tmp_path / "f.svg")
    plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:400]
    assert _leftovers(tmp_path) == []


def test_unwritable_target_names_the_file_not_the_temp_file(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match=r"cannot write .*a_file/x\.json") as info:
        atomic_write_json(blocker / "x.json", {"a": 1})
    assert ".tmp" not in str(info.value)
