"""Ownership of a run folder: one process at a time, no silent clobbering, a config history.

* :class:`RunFolderLock` — an exclusive ``flock`` on ``RUN_DIR/.normfree.lock`` held by rank 0
  for the whole run. The kernel drops it when the process exits, however it exits (``kill -9``
  included), so a lock file left by a dead process is simply taken over; a live holder makes
  the second ``normfree train --out DIR`` or ``--resume DIR`` stop with one line naming it.
* :func:`check_new_run_folder` — a new run refuses a folder that holds any earlier run's files
  (``best.pt``, ``metrics.jsonl``, …, not only ``last.pt``) unless asked to overwrite them.
* :func:`record_config_change` — ``config_history.jsonl``: what a resume changed and when.
* :func:`resume_overridable` — the keys a resume may change: logging, workers, devices and how
  the same step is computed (compilation, activation recomputation, memory format, evaluation
  batch, checkpoint interval), and what rescues a diverged run (learning rate and schedule,
  clipping, skipping non-finite steps).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from normfree.atomic import remove_stale_temp_files
from normfree.train.config import Config, ConfigError, validate_config

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, a warning says so
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "HISTORY_FILE",
    "LOCK_FILE",
    "RESUME_OVERRIDABLE",
    "RUN_FILES",
    "RunFolderError",
    "RunFolderLock",
    "check_new_run_folder",
    "open_run_file",
    "overridable_listed",
    "record_config_change",
    "resume_changes",
    "resume_config",
    "resume_overridable",
]

log = logging.getLogger("normfree.train")

LOCK_FILE = ".normfree.lock"
HISTORY_FILE = "config_history.jsonl"
# what a run writes into its folder (an earlier run's copy of any of them blocks a new run)
RUN_FILES = (
    "last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "summary.json", "config.yaml",
    "curves.png", "tensorboard", HISTORY_FILE, "finetune",
)  # fmt: skip
_WRITTEN_INTO = ("tensorboard", "finetune")  # the run folder's subfolders a run writes into
# keys a resume may change: they do not affect the weights already trained, and a run resumed
# on another machine may need them changed (no compiler for train.compile, less memory for the
# evaluation batch, a preemptible job saving more often) ...
RESUME_OVERRIDABLE = ("log.", "dist.", "data.workers", "data.skip_unreadable",
                      "data.eval_batch_size", "train.threads", "train.device",
                      "train.tune_malloc", "train.native_kernels", "train.compile",
                      "train.grad_checkpointing", "train.channels_last", "train.deterministic",
                      "train.checkpoint_every_steps", "out_dir", "optim.fused",
                      "optim.update_in_backward")  # fmt: skip
# ... or they are what recovers a diverged run (Brock et al. 2021b, §4: lower lr, tighter AGC)
RECOVERY_OVERRIDABLE = ("optim.lr", "optim.base_lr", "schedule.", "optim.clipping",
                        "optim.agc_eps", "train.skip_nonfinite")  # fmt: skip


class RunFolderError(ConfigError):
    """The run folder is in use, holds an earlier run, or cannot be written."""


def overridable_listed() -> str:
    """The keys a resume may change, for messages and ``--resume``'s help (``out_dir`` is
    where the folder is now, not a choice: a run continues in its own folder)."""
    keys = [k + "*" if k.endswith(".") else k
            for k in RESUME_OVERRIDABLE + RECOVERY_OVERRIDABLE if k != "out_dir"]  # fmt: skip
    return ", ".join(keys)


def resume_overridable(key: str) -> bool:
    """Whether ``key`` may change when a run is resumed."""
    return key.startswith(RESUME_OVERRIDABLE + RECOVERY_OVERRIDABLE)


def _linked(what: str) -> RunFolderError:
    return RunFolderError(f"{what} is a symbolic link; normfree does not write through links in "
                          "a run folder: remove it")  # fmt: skip


def _not_regular(path: Path) -> RunFolderError:
    return RunFolderError(f"{str(path)!r} is not a regular file; remove it")


def open_run_file(path: Path, flags: int) -> int:
    """``os.open`` of a file that normfree writes *in place* in a run folder (the lock, the
    config history): a symbolic link there is refused, not followed, so a run folder from
    elsewhere cannot point those writes at another file (:class:`RunFolderError`)."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    if path.is_symlink() and not nofollow:  # a platform without O_NOFOLLOW: look first
        raise _linked(repr(str(path)))
    try:  # O_NONBLOCK: a FIFO there fails or opens at once instead of blocking the run
        fd = os.open(path, flags | nofollow | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise _linked(repr(str(path))) from None
        if e.errno == errno.ENXIO:  # a FIFO nobody reads
            raise _not_regular(path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_regular(path)
    return fd


class RunFolderLock:
    """Exclusive lock of a run folder (see module docstring); also a context manager."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        """Take the lock, check the folder is writable and remove temporary files that an
        interrupted checkpoint write of this folder left. Raises :class:`RunFolderError`."""
        where = str(self.run_dir)
        try:
            fd, probe = tempfile.mkstemp(prefix=".normfree-probe.", dir=self.run_dir)
            os.close(fd)
            os.unlink(probe)
            fd = open_run_file(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
        except RunFolderError:
            raise
        except OSError as e:
            raise RunFolderError(
                f"run folder {where!r} is not writable ({e.strerror or e}); make it writable "
                "or copy the run elsewhere and continue it there"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunFolderError(
                    f"run folder {where!r} is in use by another normfree process ({holder}); "
                    "wait for it to finish or choose another --out"
                ) from None
        else:  # pragma: no cover
            log.warning("no file locking on this platform: one run per folder is not enforced")
        linked = [name for name in _WRITTEN_INTO if (self.run_dir / name).is_symlink()]
        if linked:  # files would be created wherever the link points
            os.close(fd)
            raise _linked(f"run folder {where!r}: {', '.join(linked)}")
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        self._fd = fd
        for p in remove_stale_temp_files(self.run_dir):
            log.warning("removed %s, left by an interrupted checkpoint write", p)
        return self

    def release(self) -> None:
        """Drop the lock (the lock file stays; it is empty of meaning once unlocked)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_new_run_folder(run_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse (:class:`RunFolderError`) a new run into a folder holding an earlier run's files;
    with ``overwrite`` delete those files instead (other files are left alone)."""
    run_dir = Path(run_dir)
    earlier = [name for name in RUN_FILES if os.path.lexists(run_dir / name)]  # links too
    if not earlier:
        return
    if not overwrite:
        hint = f"continue it with --resume {run_dir}, " if "last.pt" in earlier else ""
        raise RunFolderError(
            f"run folder {str(run_dir)!r} already holds an earlier run ({', '.join(earlier)}); "
            f"{hint}choose another --out, or pass --overwrite (train(..., overwrite=True)) "
            "to replace it"
        )
    for name in earlier:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    log.warning("--overwrite: removed the earlier run's %s from %s", ", ".join(earlier), run_dir)


def record_config_change(
    run_dir: str | Path, event: str, step: int, changes: dict[str, tuple[Any, Any]]
) -> None:
    """Append ``{"event", "step", "time", "changes": {key: {"from", "to"}}}`` to the run's
    ``config_history.jsonl``."""
    record = {
        "event": event,
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()},
    }
    fd = open_run_file(Path(run_dir) / HISTORY_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def resume_changes(
    state: dict[str, Any], run_dir: str | Path, cfg: Config
) -> dict[str, tuple[Any, Any]]:
    """What ``cfg`` changes relative to the config stored in the checkpoint ``state``;
    :class:`~normfree.train.config.ConfigError` when a change is not
    :func:`resume_overridable` (it would make the checkpoint mean something else)."""
    from normfree.train.checkpointing import checkpoint_config
    from normfree.train.config_io import config_diff

    changes = config_diff(checkpoint_config(state, Path(run_dir) / "last.pt"), cfg)
    changes.pop("out_dir", None)  # where the folder is now, not a property of the run
    fixed = [k for k in changes if not resume_overridable(k)]
    if fixed:
        raise ConfigError(
            f"cannot change {', '.join(repr(k) for k in fixed)} when resuming; a resume may "
            f"change only {overridable_listed()}"
        )
    return changes


def _no_checkpoint(run_dir: Path) -> Exception:
    """``--resume`` of a folder without ``last.pt``: the run stopped before its first
    checkpoint. What starts it again: the parent run's ``--resume`` for a fine-tuning phase
    (``RUN_DIR/finetune``), else a new run into the same folder."""
    from normfree.train.checkpointing import CheckpointError

    where = f"--resume {str(run_dir)!r}: no checkpoint file at {str(run_dir / 'last.pt')!r}"
    parent = run_dir.parent
    if run_dir.name == "finetune" and (parent / "last.pt").is_file():
        return CheckpointError(
            f"{where}: the fine-tuning phase stopped before its first checkpoint; start it "
            f"again with --resume {parent}"
        )
    again = f"normfree train --out {run_dir} --overwrite ..."
    if (run_dir / "config.yaml").is_file():  # the run's whole config, out_dir included
        again = f"normfree train --config {run_dir / 'config.yaml'} --overwrite"
    return CheckpointError(
        f"{where}: the run stopped before its first checkpoint; start it again: {again}"
    )


def resume_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """The config to resume ``run_dir`` with: the checkpoint's, plus ``overrides`` (only
    :func:`resume_overridable` keys, or other keys given the value they have). An edited
    ``config.yaml`` does not take effect: the differences are logged with the note that the
    checkpoint's config wins."""
    from normfree.train.checkpointing import (
        CheckpointError,
        checkpoint_config,
        load_checkpoint,
    )
    from normfree.train.config_io import (
        apply_overrides,
        config_diff,
        config_from_dict,
        load_config_file,
    )

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "a file, not a run folder" if run_dir.is_file() else "no such run folder"
        raise ConfigError(f"--resume {str(run_dir)!r}: {what}")

    def refused(key: str) -> ConfigError:
        if key == "out_dir":
            return ConfigError(
                f"cannot change 'out_dir' when resuming: the run continues in its own folder "
                f"{str(run_dir)!r}; to branch it, start a new run from its weights "
                f"(out_dir=NEW init_from={run_dir / 'last.pt'})"
            )
        return ConfigError(
            f"cannot change {key!r} when resuming (only {overridable_listed()}); to train "
            f"with another value, start a new run from its weights: "
            f"init_from={run_dir / 'last.pt'} --out NEW_DIR"
        )

    keys = [item.split("=", 1)[0].strip() for item in overrides]
    fixed = [key for key in keys if key == "out_dir" or not resume_overridable(key)]
    last = run_dir / "last.pt"
    try:
        cfg = checkpoint_config(load_checkpoint(last), last)
    except CheckpointError:
        if fixed:  # nothing to compare with: a key that cannot change is the first problem
            raise refused(fixed[0]) from None
        if not os.path.lexists(last):
            raise _no_checkpoint(run_dir) from None
        raise
    for key, item in zip(keys, overrides):
        if key in fixed and config_diff(cfg, apply_overrides(cfg, [item])):
            raise refused(key)  # (a key that cannot change may be given its stored value)
    edited = run_dir / "config.yaml"
    if edited.is_file():
        try:
            on_disk = config_from_dict(load_config_file(edited))
        except ConfigError as e:
            log.warning("resume: config.yaml is not a valid config (%s); ignoring it", e)
        else:
            diff = config_diff(cfg, on_disk)
            diff.pop("out_dir", None)
            if diff:
                lines = "; ".join(
                    f"{k}: checkpoint {a!r}, config.yaml {b!r}" for k, (a, b) in diff.items()
                )
                log.warning(
                    "resume: config.yaml was edited after the checkpoint was written (%s). The "
                    "checkpoint's config wins and config.yaml is rewritten from it; to change a "
                    "key on resume pass it as KEY=VALUE (allowed: %s)",
                    lines,
                    overridable_listed(),
                )
    cfg = apply_overrides(cfg, overrides)
    validate_config(cfg)  # refused here, once, before a process is spawned or a file touched
    return cfg
