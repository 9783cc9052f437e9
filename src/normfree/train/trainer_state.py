"""The persistent side of a :class:`~normfree.train.loop.Trainer`: run folder, checkpoint
state (what ``last.pt`` holds and how a resumed run restores it) and the run summary.

``TrainerState`` is a mixin: it reads the attributes ``Trainer.__init__`` sets (``cfg``,
``info``, ``model``, ``ema``, ``optimizer``, ``scheduler``, ``scaler``, ``bundle``, the position
counters ``epoch``/``step_in_epoch``/``global_step``, the epoch's running ``epoch_totals`` and
``best``/``last_eval``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from normfree.optim.ema import ModelEMA
from normfree.optim.schedules import WarmupDecayLR
from normfree.train import builders as B
from normfree.train.checkpointing import (
    CheckpointError,
    atomic_link_or_copy,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
)
from normfree.train.config import Config, ConfigError
from normfree.train.config_io import config_to_dict
from normfree.train.distributed import DistInfo, example_seed
from normfree.train.run_folder import RunFolderError, RunFolderLock, check_new_run_folder

__all__ = [
    "TrainerState",
    "default_run_dir",
    "lock_for_resume",
    "prepare_run_dir",
    "setup_sync_batchnorm",
]

log = logging.getLogger("normfree.train")


def default_run_dir(cfg: Config, data_name: str, root: str | Path = "runs") -> Path:
    """A new, empty folder ``runs/<model>-<data>-<YYYYmmdd-HHMMSS>`` (relative to the working
    directory), created here: each name is taken atomically (``mkdir``), so two runs started in
    the same second get two folders, the second with ``-2`` appended (then ``-3``, ...)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    def safe(name: str) -> str:  # (``converted:sub/nf.safetensors`` made nested folders)
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)

    base = Path(root) / f"{safe(cfg.model)}-{safe(data_name)}-{stamp}"
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in itertools.count(1):
            path = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return path
    except OSError as e:
        raise ConfigError(
            f"cannot create a run folder under {str(base.parent)!r}: {e.strerror or e}; "
            "choose one with --out DIR"
        ) from e
    raise AssertionError("unreachable")  # pragma: no cover


def _on_main(info: DistInfo, action: Callable[[], object]) -> None:
    """Run ``action`` on rank 0; a ConfigError there is raised on every rank (no rank waits
    at the next collective for a rank that stopped)."""
    error = [""]
    if info.is_main:
        try:
            action()
        except ConfigError as e:
            error[0] = str(e)
    if info.distributed:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise RunFolderError(error[0])


def prepare_run_dir(
    cfg: Config, info: DistInfo, data_name: str, overwrite: bool = False
) -> tuple[Path, RunFolderLock]:
    """The run folder of a new run (rank 0 picks the name, every rank gets it), locked by rank
    0. Refuses a folder in use or holding an earlier run's files (unless ``overwrite``)."""
    name = [str(cfg.out_dir or "")]
    if not cfg.out_dir:  # rank 0 creates the default folder (a fresh name), the others follow

        def pick() -> None:
            name[0] = str(default_run_dir(cfg, data_name))

        _on_main(info, pick)
    if info.distributed:
        dist.broadcast_object_list(name, src=0)
    run_dir = Path(name[0])
    lock = RunFolderLock(run_dir)

    def claim() -> None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the run folder {str(run_dir)!r}: {e.strerror}") from e
        lock.acquire()
        try:
            check_new_run_folder(run_dir, overwrite)
        except BaseException:
            lock.release()
            raise

    _on_main(info, claim)
    return run_dir, lock


def lock_for_resume(run_dir: Path, info: DistInfo) -> RunFolderLock:
    """Rank 0's lock of a run folder being resumed (refused while another process holds it,
    or when the folder is read-only)."""
    lock = RunFolderLock(run_dir)
    _on_main(info, lock.acquire)
    return lock


def setup_sync_batchnorm(model: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
    """``train.sync_bn``: BatchNorm → SyncBatchNorm under DDP. Normalizer-free models have no
    batch statistics, so there is nothing to synchronise (a warning says so)."""
    if not cfg.train.sync_bn:
        return model
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        log.warning("train.sync_bn: %s has no BatchNorm (nothing to sync)", cfg.model)
        return model
    if not info.distributed:
        return model
    if info.device.type != "cuda":
        raise ConfigError(
            "train.sync_bn needs CUDA devices: PyTorch's SyncBatchNorm does not run on CPU/gloo"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class TrainerState:
    """Checkpoint state, resume and summary of a run (mixin of ``Trainer``)."""

    cfg: Config
    info: DistInfo
    run_dir: Path
    malloc: str | None  # what normfree.train.tune_malloc did; None where it was not asked
    # set by Trainer.__init__ (declared here for the type checker):
    t0: float
    wall_offset: float
    bundle: Any  # a normfree.data.DatasetBundle
    model_args: dict[str, Any]
    model: nn.Module
    num_params: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: WarmupDecayLR
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None
    epoch: int
    step_in_epoch: int
    global_step: int
    epoch_totals: dict[str, float]
    best: dict[str, Any]
    last_eval: dict[str, Any]

    def wall_time(self) -> float:
        """Seconds of training so far, including earlier segments of a resumed run."""
        return self.wall_offset + time.perf_counter() - self.t0

    def _with_this_kernel(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The optimizer state dict ``saved`` with this process's kernel choice (``fused`` /
        ``foreach``, where its param groups have them) in every param group. The kernel is this
        process's choice, not the checkpoint's (``optim.fused`` may change on resume, or this
        PyTorch may lack the kernel), and it must be set before loading:
        ``Optimizer.load_state_dict`` reads the saved groups' ``fused`` to decide where tensors
        such as Adam's ``step`` go (on the parameter's device for a fused kernel, on the CPU
        otherwise)."""
        kernels = [{k: g[k] for k in ("fused", "foreach") if k in g}
                   for g in self.optimizer.param_groups]  # fmt: skip
        groups = saved["param_groups"]
        mended = [{**g, **k} for g, k in zip(groups, kernels)]
        # surplus groups stay, so that load_state_dict still refuses a different group count
        return {**saved, "param_groups": mended + groups[len(mended):]}

    def _load_state(self, state: dict[str, Any]) -> None:
        pos = state["position"]
        if pos.get("steps_per_epoch") != self.steps_per_epoch:
            raise CheckpointError(
                f"checkpoint was written with {pos.get('steps_per_epoch')} steps per epoch, this "
                f"configuration has {self.steps_per_epoch}: the data or batch size changed"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(self._with_this_kernel(state["optimizer"]))
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                if not state.get("ema"):
                    raise CheckpointError("the run keeps an EMA but the checkpoint holds none")
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, KeyError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"checkpoint does not match this model/optimizer: {e}") from e
        self.epoch, self.step_in_epoch = int(pos["epoch"]), int(pos["step_in_epoch"])
        self.global_step = int(pos["global_step"])
        prog = state.get("progress", {})
        self.best = dict(prog.get("best", self.best))
        self.last_eval = dict(prog.get("last_eval", {}))
        self.wall_offset = float(prog.get("wall_time_s", 0.0))
        self.skipped_steps = int(prog.get("skipped_steps", 0))
        # train.skip_nonfinite: the run stops at MAX_SKIPPED_IN_A_ROW in a row, across a resume
        self.skipped_in_a_row = int(prog.get("skipped_in_a_row", 0))
        totals = prog.get("epoch_totals")  # absent in checkpoints of older versions
        if self.step_in_epoch and isinstance(totals, dict):
            self.epoch_totals = {k: float(totals.get(k, 0.0)) for k in ("loss", "n", "correct")}
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            restore_rng_state(rngs[self.info.rank])
        else:
            log.warning(
                "checkpoint has RNG states of %d ranks, resuming on %d: dropout/stochastic-depth "
                "draws are reseeded (the data order is unaffected)",
                len(rngs),
                self.info.world_size,
            )
            torch.manual_seed(example_seed(self.cfg.seed, self.info.rank, self.global_step))
        log.info("resumed %s at epoch %d, step %d", self.run_dir, self.epoch, self.global_step)

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`_load_state` needs (RNG states of all ranks gathered on rank 0)."""
        rng = capture_rng_state()
        rngs: list[Any] = [rng]
        if self.info.distributed:
            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng)
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rngs,
            "position": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "steps_per_epoch": self.steps_per_epoch,
                "sampler_seed": self.cfg.seed,
                "world_size": self.info.world_size,
            },
            "config": config_to_dict(self.cfg),
            "model_args": self.model_args,
            "data_info": self.data_info(),
            "progress": {
                "best": self.best,
                "last_eval": self.last_eval,
                "wall_time_s": self.wall_time(),
                "skipped_steps": self.skipped_steps,
                "skipped_in_a_row": self.skipped_in_a_row,
                # the epoch's running train loss/accuracy sums, for a mid-epoch resume
                "epoch_totals": dict(self.epoch_totals) if self.step_in_epoch else None,
            },
        }

    def data_info(self) -> dict[str, Any]:
        """What a user of the weights needs to feed the model: input size, channels and
        normalisation, class names (kept in checkpoints for ``normfree export``)."""
        b = self.bundle
        return {
            "name": b.name, "num_classes": b.num_classes, "in_chans": b.in_chans,
            "image_size": b.image_size, "test_size": b.test_size,
            "mean": list(b.mean), "std": list(b.std), "classes": b.classes,
        }  # fmt: skip

    def save(self, best: bool = False) -> None:
        state = self.state_dict()  # collective: every rank takes part
        if self.info.is_main:
            save_checkpoint(state, self.run_dir / "last.pt")
            if best:
                atomic_link_or_copy(self.run_dir / "last.pt", self.run_dir / "best.pt")

    def summary(self, status: str) -> dict[str, Any]:
        e = self.last_eval
        return {
            "status": status,
            "model": self.cfg.model,
            "data": self.cfg.data.spec,
            "num_params": self.num_params,
            "val_top1": e.get("val_top1"),
            "val_top5": e.get("val_top5"),
            "val_loss": e.get("val_loss"),
            "best_val_top1": self.best["val_top1"] if self.best["epoch"] else None,
            "ema_val_top1": e.get("ema_val_top1"),
            "ema_val_top5": e.get("ema_val_top5"),
            "ema_val_loss": e.get("ema_val_loss"),
            "best_ema_val_top1": self.best["ema_val_top1"] if self.best["epoch"] else None,
            "best_epoch": self.best["epoch"] or None,
            "best_metric": self.cfg.train.best_metric,
            "epochs": self.epoch,
            "steps": self.global_step,
            "skipped_steps": self.skipped_steps,
            "wall_time_s": round(self.wall_time(), 3),
            "world_size": self.info.world_size,
            "device": str(self.info.device),
            "malloc": self.malloc,
            "train_examples": len(self.bundle.train),
            "val_examples": len(self.bundle.val),
            "image_size": getattr(self.bundle, "image_size", None),
            "test_size": getattr(self.bundle, "test_size", None),
            "peak_lr": B.peak_lr(self.cfg),
            "agc": B.agc_enabled(self.cfg, self.model),
            "run_dir": str(self.run_dir),
        }
