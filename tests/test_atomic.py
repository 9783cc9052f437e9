"""Atomic writes: the target is either the old file or the new one, never a partial one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from normfree.atomic import (
    atomic_save_figure,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    file_mode,
    overwritten_input,
    remove_stale_temp_files,
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


def test_files_honour_the_umask(tmp_path: Path) -> None:
    """New files get ``0o666 & ~umask`` like ``open()`` would, not mkstemp's 0o600."""
    import os

    old = os.umask(0o022)
    try:
        assert file_mode() == 0o644
        a = atomic_write_json(tmp_path / "a.json", {"a": 1})
        os.umask(0o002)
        b = atomic_write_text(tmp_path / "b.txt", "b")
    finally:
        os.umask(old)
    assert a.stat().st_mode & 0o777 == 0o644
    assert b.stat().st_mode & 0o777 == 0o664


def test_disk_full_is_a_named_oserror_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    import torch

    from normfree.checkpoints.io import atomic_save

    path = tmp_path / "last.pt"
    atomic_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    class Full:  # torch.save writes through f.write; the disk fills after 1 kB
        def __init__(self, f) -> None:
            self.f = f

        def write(self, data: bytes) -> int:
            if self.f.tell() + len(data) > 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name: str):
            return getattr(self.f, name)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match=r"cannot write .*last\.pt: the disk is full") as info:
        atomic_save({"w": torch.zeros(10_000)}, path)  # torch.save: "RuntimeError: unexpected pos"
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"x" * 10)
    (tmp_path / ".best.pt.k_9z.tmp").write_bytes(b"x")
    (tmp_path / "keep.tmp").write_text("not ours")
    (tmp_path / "last.pt").write_text("kept")
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == [".best.pt.k_9z.tmp", ".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp", "last.pt"]


def test_overwritten_input_finds_an_output_naming_an_existing_input(tmp_path: Path) -> None:
    """The first input file (in order) that some output names, through a link too; inputs
    not given or not existing, and outputs elsewhere, are no clash."""
    model = tmp_path / "m.pt"
    model.write_bytes(b"weights")
    link = tmp_path / "link.pt"
    link.symlink_to(model)
    outs = [("--out", tmp_path / "x.pt2"), ("--json", str(link))]
    assert overwritten_input(outs, [("SOURCE", None), ("--weights", str(model))]) == (
        "--json", str(link), "--weights", str(model)
    )
    assert overwritten_input(outs, [("SOURCE", tmp_path / "absent.pt")]) is None
    assert overwritten_input([("--out", tmp_path / "y.pt")], [("SOURCE", model)]) is None


def test_a_fifo_or_a_link_to_one_is_written_into_not_replaced(tmp_path: Path) -> None:
    """A target that exists and is no regular file (a FIFO here; ``/dev/null``, ``/dev/stdout``)
    is written into: the rename used to replace the node or the link with a plain file (as
    root, ``--csv /dev/null`` would have replaced the system's ``/dev/null``)."""
    import stat
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(fifo)
    for target in (fifo, link):
        got: list[bytes] = []
        reader = threading.Thread(target=lambda out=got: out.append(fifo.read_bytes()))
        reader.start()
        check_writable(target)
        atomic_write_text(target, "streamed\n")
        reader.join(timeout=10)
        assert got == [b"streamed\n"]
        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link"]  # no temp files


def test_a_path_ending_in_a_separator_names_a_folder(tmp_path: Path) -> None:
    """``--json out/x/`` wrote a file named ``x``: the trailing slash meant a folder."""
    for write in (lambda p: check_writable(p), lambda p: atomic_write_text(p, "x")):
        with pytest.raises(OSError, match="ends in a separator, so it names a folder"):
            write(f"{tmp_path}/new/x/")
    assert not (tmp_path / "new").exists()
