"""Training checkpoints: atomic writes, strict loads and RNG state capture.

A checkpoint is one ``torch.save`` mapping of tensors and plain Python values (the config is a
plain dict), so it loads with ``torch.load(weights_only=True)``::

    {"format": "normfree-train", "version": 1, "model": ..., "ema": ..., "optimizer": ...,
     "scheduler": ..., "scaler": ..., "rng": [per-rank states], "position": {"epoch", ...},
     "config": {...}, "model_args": {...}, "data_info": {...}, "progress": {...}}

``data_info`` (input size, channels, normalisation, class names; absent in files written before
it existed) tells a deployment what to feed the model.

Writes go to a temporary file in the destination folder, are flushed and ``fsync``-ed, then
renamed over the target with ``os.replace`` (atomic on POSIX and Windows), so a crash mid-write
leaves the previous checkpoint intact. A file that cannot be read or is not a normfree training
checkpoint raises :class:`CheckpointError` — never a silent fresh start.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normfree.atomic import atomic_write_bytes
from normfree.checkpoints.errors import CheckpointError
from normfree.checkpoints.io import atomic_save, load_torch_file
from normfree.checkpoints.state_dict import compare_state_dict

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "REQUIRED_KEYS",
    "CheckpointError",
    "atomic_link_or_copy",
    "capture_rng_state",
    "check_weights_fit",
    "checkpoint_config",
    "checkpoint_model",
    "checkpoint_weights",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "normfree-train"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "rng", "position", "config", "model_args")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically to ``path`` (:func:`normfree.checkpoints.atomic_save`: temp
    file in the same folder, fsync, rename). ``format`` and ``version`` keys are added; if
    anything fails an existing ``path`` is left untouched."""
    path = Path(path)
    atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, path)
    return path


def atomic_link_or_copy(src: str | Path, dst: str | Path) -> Path:
    """Make ``dst`` a snapshot of ``src`` atomically: a hard link when the file system allows
    (``src`` is later *replaced*, not rewritten, so the link keeps this version), else a copy."""
    src, dst = Path(src), Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here: copy into a temp file, then rename

        def copy(fout: Any) -> None:
            with open(src, "rb") as fin:
                shutil.copyfileobj(fin, fout, 1 << 24)

        atomic_write_bytes(dst, copy)
        return dst
    try:
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dst


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a training checkpoint (``torch.load(weights_only=True)``).

    Raises:
        CheckpointError: the file is missing, unreadable/truncated, or not a normfree training
            checkpoint (wrong format tag, newer version, missing keys).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {str(path)!r}")
    state = load_torch_file(path, map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a normfree training checkpoint "
            f"(expected a mapping with format={CHECKPOINT_FORMAT!r})"
        )
    version = state.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has version {version!r}; this normfree reads "
            f"versions <= {CHECKPOINT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: missing {missing}")
    return state


def checkpoint_weights(state: dict[str, Any], ema: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict of a loaded training checkpoint: the raw weights, or with ``ema``
    the EMA weights (:class:`CheckpointError` when the run kept none)."""
    if not ema:
        return state["model"]
    if not state.get("ema"):
        raise CheckpointError("the checkpoint holds no EMA weights (train.ema was off)")
    return state["ema"]["module"]


def check_weights_fit(
    model_args: dict[str, Any], weights: dict[str, Any], path: str | Path = "checkpoint"
) -> None:
    """Check a checkpoint's tensors against the model its ``model_args`` describe *before* that
    model is allocated: the model is built on the meta device (no memory), and every parameter
    and buffer must be present with the checkpoint's shape. A file whose ``model_args`` ask for
    a model its tensors do not fill (e.g. a few MB asking for a 1.5 GB model) raises
    :class:`CheckpointError` naming what differs."""
    from normfree.train.builders import build_model

    if not isinstance(weights, dict) or not all(
        isinstance(t, torch.Tensor) for t in weights.values()
    ):
        raise CheckpointError(f"{str(path)!r}: the model weights are not a mapping of tensors")
    with torch.device("meta"):
        skeleton = build_model(model_args)
    report = compare_state_dict(skeleton, weights)
    missing, unexpected = report.missing, report.unexpected
    wrong = [f"{k}: checkpoint {got}, model {want}" for k, want, got in report.mismatched]
    if missing or unexpected or wrong:
        size = sum(t.numel() for t in skeleton.state_dict().values())
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: {'; '.join(sorted(items)[:3])}{more}")
        raise CheckpointError(
            f"{str(path)!r} does not hold the weights of the model its model_args describe "
            f"({model_args.get('name')!r}, {size / 1e6:.1f}M values): {' | '.join(parts)}; "
            "the file is damaged or was not written by normfree train"
        )


def checkpoint_model(
    state: dict[str, Any], path: str | Path = "checkpoint", ema: bool = False
) -> torch.nn.Module:
    """The model of a loaded training checkpoint with its raw (or ``ema``) weights: the
    tensors are checked against ``model_args`` on the meta device first
    (:func:`check_weights_fit`), so a small file cannot make a huge model be allocated."""
    from normfree.checkpoints.state_dict import load_state_dict_checked
    from normfree.train.builders import build_model

    weights = checkpoint_weights(state, ema=ema)
    check_weights_fit(state["model_args"], weights, path)
    model = build_model(state["model_args"])
    load_state_dict_checked(model, weights, source=str(path))
    return model


def checkpoint_config(state: dict[str, Any], path: str | Path = "checkpoint") -> Any:
    """The :class:`~normfree.train.config.Config` stored in a checkpoint (CheckpointError when
    this version of normfree cannot read it)."""
    from normfree.train.config import ConfigError
    from normfree.train.config_io import config_from_dict

    try:
        return config_from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{str(path)!r} holds a config this normfree cannot read: {e}") from e


# ----------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and CUDA generator states (plain values and
    tensors only, ``weights_only``-loadable)."""
    np_state = np.random.get_state()  # noqa: NPY002  (the global legacy RNG is what we save)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        npst = state["numpy"]
        key = npst["key"].numpy().astype(np.uint32)
        np.random.set_state(  # noqa: NPY002  (the global legacy RNG is what we save)
            ("MT19937", key, npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
        )
        torch.set_rng_state(state["torch"])
        cuda_states = state.get("cuda") or []
        if cuda_states and torch.cuda.is_available():
            if len(cuda_states) != torch.cuda.device_count():
                raise CheckpointError(
                    f"checkpoint holds CUDA RNG states for {len(cuda_states)} devices, "
                    f"this process sees {torch.cuda.device_count()}"
                )
            torch.cuda.set_rng_state_all(cuda_states)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"malformed RNG state in checkpoint: {e}") from e
