"""Training checkpoints: atomic writes (a crash mid-write keeps the old file), strict loads
(truncated / foreign files are errors), RNG state capture and the best.pt snapshot."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from normfree.train import checkpointing as ck
from normfree.train.checkpointing import CheckpointError, load_checkpoint, save_checkpoint


def _state(value: float) -> dict:
    return {
        "model": {"w": torch.full((3,), value)},
        "optimizer": {},
        "scheduler": {},
        "rng": [ck.capture_rng_state()],
        "position": {"epoch": 1, "step_in_epoch": 2, "global_step": 7},
        "config": {"model": "x", "nested": {"a": [1, 2]}},
        "model_args": {"name": "x", "num_classes": 10, "in_chans": 1, "kwargs": {}},
    }


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_roundtrip_with_weights_only(tmp_path: Path) -> None:
    path = save_checkpoint(_state(1.0), tmp_path / "last.pt")
    raw = torch.load(path, weights_only=True)  # plain values and tensors only
    assert raw["format"] == ck.CHECKPOINT_FORMAT and raw["version"] == ck.CHECKPOINT_VERSION
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.ones(3))
    assert state["config"] == {"model": "x", "nested": {"a": [1, 2]}}
    assert _no_temp_files(tmp_path)


def test_crash_during_write_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_checkpoint(_state(1.0), tmp_path / "last.pt")
    real_save = torch.save

    def torn_save(obj: object, f: object, *a: object, **k: object) -> None:
        real_save(obj, f, *a, **k)
        f.truncate(100)  # type: ignore[attr-defined]  # half-written file, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(2.0), path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert _no_temp_files(tmp_path)

    def failing_replace(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # killed between write and rename

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(3.0), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert _no_temp_files(tmp_path)


def test_corrupt_or_foreign_files_are_errors(tmp_path: Path) -> None:
    path = save_checkpoint(_state(1.0), tmp_path / "last.pt")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not a normfree training checkpoint"):
        load_checkpoint(foreign)
    incomplete = tmp_path / "incomplete.pt"
    torch.save({"format": ck.CHECKPOINT_FORMAT, "version": 1, "model": {}}, incomplete)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(incomplete)
    newer = tmp_path / "newer.pt"
    torch.save({**_state(1.0), "format": ck.CHECKPOINT_FORMAT, "version": 99}, newer)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(newer)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")


def test_rng_state_roundtrip_through_a_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002  (the global legacy RNG is what checkpoints save)
    torch.manual_seed(3)
    save_checkpoint(_state(0.0), tmp_path / "c.pt")
    first = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    restored = load_checkpoint(tmp_path / "c.pt")["rng"][0]
    ck.restore_rng_state(restored)
    again = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])
    with pytest.raises(CheckpointError, match="malformed RNG state"):
        ck.restore_rng_state({"python": 3})


def test_best_snapshot_survives_replacing_last(tmp_path: Path) -> None:
    last = save_checkpoint(_state(1.0), tmp_path / "last.pt")
    ck.atomic_link_or_copy(last, tmp_path / "best.pt")
    save_checkpoint(_state(5.0), last)
    assert torch.equal(load_checkpoint(tmp_path / "best.pt")["model"]["w"], torch.ones(3))
    assert torch.equal(load_checkpoint(last)["model"]["w"], torch.full((3,), 5.0))
    assert _no_temp_files(tmp_path)
