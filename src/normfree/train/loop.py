"""The training loop: :func:`train` runs a :class:`~normfree.train.config.Config` end to end.

One optimizer step = ``accum_steps`` micro-batches per rank; the loss is the mean over the global
batch (label smoothing, or MixUp/CutMix soft targets), AGC clips inside ``optimizer.step``, the
learning rate follows the per-step warmup + cosine schedule and the EMA is updated after every
step. Each epoch ends with an evaluation of the raw and EMA weights and an atomic ``last.pt``
(``best.pt`` follows the best ``train.best_metric``). Resuming restores model, EMA, optimizer,
schedule, scaler, per-rank RNG states and the data position (epoch, step within the epoch;
the data order is a function of ``seed`` and epoch), so on CPU with deterministic settings a
resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normfree.nn import ScaledStdConv2d, compile_options, native_kernels
from normfree.nn.activations import TanhGELU
from normfree.nn.native import KERNELS, environment_kernels
from normfree.nn.native import extension as native_extension
from normfree.optim import AGC, BackwardUpdate, attached, update_in_backward
from normfree.train import builders as B
from normfree.train.allocator import release_heap, tune_malloc
from normfree.train.callbacks import Callback
from normfree.train.checkpointing import check_weights_fit, checkpoint_config, load_checkpoint
from normfree.train.config import (
    UPDATE_IN_BACKWARD_ONE_PROCESS,
    Config,
    ConfigError,
    chosen_kernels,
    native_kernel_choice,
    validate_config,
    validate_world_size,
)
from normfree.train.config_io import checked_config, config_to_dict, dump_config
from normfree.train.distill import check_teacher_fits, distillation_loss, load_teacher
from normfree.train.distributed import (
    DistInfo,
    ShardedBatchSampler,
    all_reduce_sum,
    cleanup_distributed,
    example_seed,
    init_distributed,
    local_world_size,
)
from normfree.train.errors import NonFiniteLossError, RunAlreadyComplete, TrainingInterrupted
from normfree.train.evaluate import autocast_context, evaluate
from normfree.train.run_folder import RunFolderLock, record_config_change, resume_changes
from normfree.train.run_logger import RunLogger
from normfree.train.trainer_state import (
    TrainerState,
    lock_for_resume,
    prepare_run_dir,
    setup_sync_batchnorm,
)

MAX_SKIPPED_IN_A_ROW = 5  # with train.skip_nonfinite: this many in a row end the run

__all__ = ["NonFiniteLossError", "RunAlreadyComplete", "Trainer", "TrainingInterrupted", "train"]

log = logging.getLogger("normfree.train")


class Trainer(TrainerState):
    """Holds the state of one run; :meth:`fit` trains and returns ``summary.json``'s content."""

    def __init__(
        self,
        cfg: Config,
        info: DistInfo,
        resume: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        overwrite: bool = False,
    ) -> None:
        validate_config(cfg)
        validate_world_size(cfg, info.world_size)  # before the run folder is written
        self.cfg, self.info, self.t0 = cfg, info, time.perf_counter()
        self.callbacks = list(callbacks)
        self._lock: RunFolderLock | None = None
        try:
            self._setup(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (done by :meth:`fit`; idempotent)."""
        if self._lock is not None:
            self._lock.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _setup(self, resume: str | Path | None, overwrite: bool) -> None:
        cfg, info = self.cfg, self.info
        t = cfg.train
        cores = os.cpu_count() or 1
        threads = t.threads or max(1, cores // local_world_size())
        if threads > cores:  # more only slows a run, and thousands crash the OpenMP runtime
            log.warning("train.threads=%d is more than the %d cores: using %d", threads, cores,
                        cores)  # fmt: skip
            threads = cores
        torch.set_num_threads(threads)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.malloc = None
        if t.tune_malloc and info.device.type == "cpu":
            self.malloc = tune_malloc()  # before the data and the model are allocated
            # said aloud where the user's own allocator settings took precedence
            chose = "configured" in self.malloc or "refused" in self.malloc
            log.log(logging.INFO if chose else logging.DEBUG, "%s", self.malloc)
        state = None
        changes: dict[str, tuple[Any, Any]] = {}
        if resume is not None:
            self.run_dir = Path(resume)
            state = load_checkpoint(self.run_dir / "last.pt")
            changes = resume_changes(state, self.run_dir, cfg)
            stored_out = state["config"].get("out_dir")
            if cfg.out_dir != stored_out:  # the run continues in its own folder: kept as is
                self.cfg = cfg = dataclasses.replace(cfg, out_dir=stored_out)
            self._lock = lock_for_resume(self.run_dir, info)
            self._refuse_if_complete(state)
        # same initialisation on every rank
        B.seed_globals(cfg.seed)
        self.bundle = B.build_data(cfg)
        if state is None:
            self.model_args = B.model_args(cfg, self.bundle.num_classes, self.bundle.in_chans)
        else:
            self.model_args = state["model_args"]
            check_weights_fit(self.model_args, state["model"], Path(resume or ".") / "last.pt")
        model = B.build_model(self.model_args)
        B.check_input_size(model, getattr(self.bundle, "image_size", None), "data.image_size")
        B.check_input_size(model, getattr(self.bundle, "test_size", None), "data.test_size")
        if t.finetune_epochs > 0:  # now, not when the fine-tuning phase starts, epochs later
            B.check_input_size(model, t.finetune_size, "train.finetune_size")
        if state is None:
            B.init_weights_from(cfg, model)
        model = setup_sync_batchnorm(model, cfg, info)
        if t.grad_checkpointing:
            recompute = getattr(model, "set_grad_checkpointing", None)
            if recompute is None:  # e.g. a model made by normfree convert: no block list
                raise ConfigError(
                    f"train.grad_checkpointing=true: {cfg.model} does not say which blocks to "
                    "recompute (no set_grad_checkpointing); set train.grad_checkpointing=false"
                )
            recompute(True)
        model.to(info.device)
        if t.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.num_params = B.count_params(model)
        self.steps_per_epoch = B.steps_per_epoch(cfg, len(self.bundle.train))
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.optimizer = B.build_optimizer(cfg, model)
        self.scheduler = B.build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.step_lr = self._lr()  # the rate of the latest step (set by each _train_step)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=t.precision == "fp16")
        self.backward_update = None
        if cfg.optim.update_in_backward:
            self.backward_update = self._build_backward_update()
        self.ema = None
        if cfg.ema.enabled:
            from normfree.optim.ema import ModelEMA

            self.ema = ModelEMA(model, decay=cfg.ema.decay, warmup=cfg.ema.warmup)
        self.teacher = None
        if cfg.distill.teacher is not None:
            self.teacher = load_teacher(cfg, info.device)
            check_teacher_fits(self.teacher, self.bundle.val[0][0], self.bundle.num_classes)
        self.mixer = None
        if cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0:
            from normfree.data import BatchMixer

            self.mixer = BatchMixer(
                self.bundle.num_classes,
                mixup_alpha=cfg.data.mixup_alpha,
                cutmix_alpha=cfg.data.cutmix_alpha,
                switch_prob=cfg.data.mix_switch_prob,
                label_smoothing=t.label_smoothing,
            )
        self.epoch = self.step_in_epoch = self.global_step = self.skipped_steps = 0
        self.skipped_in_a_row = 0  # non-finite losses since the last step taken
        self.epoch_totals = _fresh_totals()  # this epoch's loss·n, n and correct so far
        self.best: dict[str, Any] = {"val_top1": -math.inf, "ema_val_top1": -math.inf, "epoch": 0}
        self.last_eval: dict[str, Any] = {}
        self.wall_offset = 0.0
        if state is not None:
            self._load_state(state)
            if changes:
                self._apply_resume_changes(changes)
        else:
            torch.manual_seed(example_seed(cfg.seed, info.rank, 0x7A11))
            random.seed(example_seed(cfg.seed, info.rank, 0x9A11))
            np.random.seed(example_seed(cfg.seed, info.rank, 0x4A11) % (1 << 32))  # noqa: NPY002  (the global legacy RNG is what we save)
            self.run_dir, self._lock = prepare_run_dir(cfg, info, self.bundle.name, overwrite)
        self.train_model: nn.Module = model
        if info.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None
            )
        if t.compile:
            # inductor; on CPU, 1×1 convs run as normfree::pointwise_conv2d (nn.compile_options)
            self.train_model = torch.compile(self.train_model, options=compile_options(info.device))
        self.logger = RunLogger(
            self.run_dir,
            enabled=info.is_main,
            tensorboard=cfg.log.tensorboard,
            csv=cfg.log.csv,
            plot=cfg.log.plot,
            resume_step=self.global_step if state is not None else None,
        )
        if info.is_main:
            dump_config(cfg, self.run_dir / "config.yaml")
        self._stop_requested = False
        self._aborted = False  # a second SIGINT/SIGTERM: stop at once, without saving
        self._updating = False

    def _refuse_if_complete(self, state: dict[str, Any]) -> None:
        """:class:`RunAlreadyComplete` when the checkpoint has trained every epoch: a resume
        would train nothing and only rewrite the summary. ``config.yaml`` is rewritten from
        the checkpoint where it was edited (as the resume's warning says)."""
        done, epochs = int(state["position"]["epoch"]), self.cfg.train.epochs
        if done < epochs:
            return
        run_dir = self.run_dir
        stored = checkpoint_config(state, run_dir / "last.pt")
        if self.info.is_main:
            text, path = dump_config(stored), run_dir / "config.yaml"
            if not path.is_file() or path.read_text() != text:
                dump_config(stored, path)
        finetune = run_dir / "finetune"
        phase = _finetune_phase(finetune) if stored.train.finetune_epochs > 0 else None
        also = f" (its fine-tuning phase {finetune} too)" if phase == "complete" else ""
        raise RunAlreadyComplete(
            f"run {str(run_dir)!r} is already complete ({done} of {epochs} epochs), nothing to "
            f"train{also}; to train further, start a new run from its weights: normfree train "
            f"init_from={run_dir / 'last.pt'} --out NEW_DIR",
            run_dir,
            config=stored,
            model_args=state["model_args"],
            finetune_pending=phase == "pending",
            finetune_partial=phase == "partial",
        )

    def _build_backward_update(self) -> BackwardUpdate | None:
        """``optim.update_in_backward``: the optimizer's step (SGD, Adam or AdamW), with the
        AGC attached to the optimizer, applied to the Scaled-WS conv weights inside their
        native backward (:func:`normfree.optim.update_in_backward`), on CPU and in one
        process."""
        t = self.cfg.train
        if self.info.device.type != "cpu":
            log.warning("optim.update_in_backward ignored: it runs in the native kernels, on CPU")
            return None
        if self.info.distributed:
            raise ConfigError(UPDATE_IN_BACKWARD_ONE_PROCESS)
        plain = [key for key, on in (("train.compile", t.compile),
                                     ("train.grad_checkpointing", t.grad_checkpointing))
                 if on]  # fmt: skip
        if t.channels_last:
            plain.append("train.channels_last (for the k×k convs, not contiguous in that layout)")
        if plain and self.info.is_main:
            log.warning(
                "optim.update_in_backward with %s: those weights get gradients and the "
                "optimizer updates them as usual",
                ", ".join(plain),
            )
        agc = next((a for a in attached(self.optimizer) if isinstance(a, AGC)), None)
        try:
            return update_in_backward(self.optimizer, self.model, agc=agc)
        except (TypeError, ValueError) as err:
            hint = ""
            if "MeanShiftRejection" in str(err):
                hint = " (set optim.msr=false)"
            elif "scaled_ws" not in _kernels_used_by(self.model):
                hint = (f"; set optim.update_in_backward=false: {self.cfg.model} has no "
                        "Scaled-WS convolutions")  # fmt: skip
            raise ConfigError(f"config key 'optim.update_in_backward': {err}{hint}") from err

    def _apply_resume_changes(self, changes: dict[str, tuple[Any, Any]]) -> None:
        """A resume that changes the learning rate, schedule or clipping (diverged-run
        recovery): the loaded optimizer keeps its state (momentum, step counts) but takes the
        new config's group hyperparameters, and the schedule continues from the same step with
        the new peak and shape. The change is recorded in ``config_history.jsonl``."""
        cfg = self.cfg
        if any(k.startswith(("optim.", "schedule.")) for k in changes):
            # a throw-away optimizer over a copy of the model (wrappers may touch weights)
            fresh = B.build_optimizer(cfg, copy.deepcopy(self.model))
            sched = B.build_scheduler(cfg, fresh, self.steps_per_epoch)
            for group, new in zip(self.optimizer.param_groups, fresh.param_groups):
                group.update({k: v for k, v in new.items() if k not in ("params", "lr")})
            # the new schedule's shape (every key of its state but where it stands)
            state = sched.state_dict()
            where = self.scheduler.state_dict()
            state.update({k: v for k, v in where.items() if k.startswith("_") or k == "last_epoch"})
            self.scheduler.load_state_dict(state)
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
                group["lr"] = lr
            for action in attached(self.optimizer):  # ε lives on the AGC hook, not the groups
                if isinstance(action, AGC):
                    action.eps = float(cfg.optim.agc_eps)
        if self.info.is_main:
            for key, (old, new) in changes.items():
                log.warning("resume: %s changed from %r to %r", key, old, new)
            record_config_change(self.run_dir, "resume", self.global_step, changes)

    # ------------------------------------------------------------------------------ training
    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.mixer is not None:
            from normfree.data import soft_target_cross_entropy

            return soft_target_cross_entropy(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.cfg.train.label_smoothing)

    def _train_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        cfg, info, dev = self.cfg, self.info, self.info.device
        number = self.global_step + 1  # 1-based number of this step
        self.step_lr = self._lr()  # the rate this step uses (logged; the scheduler moves on)
        sums = torch.zeros(5, dtype=torch.float64, device=dev)  # loss, n, correct, bad, stop
        for k, (x, y) in enumerate(micro):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            target = y
            if self.mixer is not None:
                gen = torch.Generator().manual_seed(example_seed(cfg.seed, number, k, info.rank))
                x, target = self.mixer(x, y, gen)
            last = k == len(micro) - 1
            sync = contextlib.nullcontext()
            if info.distributed and not last:
                sync = self.train_model.no_sync()  # type: ignore[operator]
            with sync:
                with autocast_context(dev, cfg.train.precision):
                    logits = self.train_model(x)
                    if self.teacher is not None:
                        with torch.no_grad():
                            teacher_logits = self.teacher(x)
                loss = self._loss(logits.float(), target)
                if self.teacher is not None:
                    w = cfg.distill.weight
                    soft = distillation_loss(logits, teacher_logits, cfg.distill.temperature)
                    loss = (1.0 - w) * loss + w * soft
                for cb in self.callbacks:
                    loss = cb.on_loss(self, number, loss)
                if self.backward_update is None:
                    self.scaler.scale(loss / len(micro)).backward()
                elif bool(torch.isfinite(loss)):  # else the step is skipped below
                    self._updating = True  # this backward updates weights: no save inside it
                    self.scaler.scale(loss / len(micro)).backward()
            n = y.shape[0]
            sums[0] += loss.detach().double() * n
            sums[1] += n
            if self.mixer is None:
                sums[2] += (logits.detach().argmax(1) == y).sum()
        sums[3] = float(not torch.isfinite(sums[0]).item())
        sums[4] = float(self._stop_requested)
        all_reduce_sum(sums, info)
        loss_sum, n, correct, bad, stop = sums.tolist()
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            where = f"step {number} (epoch {self.epoch + 1}, batch {self.step_in_epoch + 1})"
            if not cfg.train.skip_nonfinite:
                last_pt = self.run_dir / "last.pt"
                kept = (
                    f"the last good checkpoint is kept at {last_pt}"
                    if last_pt.exists()
                    else "no checkpoint had been written yet"
                )
                raise NonFiniteLossError(
                    f"non-finite loss ({loss_sum / max(n, 1)}) at {where}; stopping, {kept}. "
                    "Lower the learning rate, check the data, or set train.skip_nonfinite=true."
                )
            self.skipped_in_a_row += 1
            broken = next((name for name, p in self.model.named_parameters()
                           if not bool(torch.isfinite(p).all())), None)  # fmt: skip
            if broken is not None or self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                why = (f"the weights themselves are not finite ({broken})" if broken else
                       f"so were the {MAX_SKIPPED_IN_A_ROW - 1} steps before it")  # fmt: skip
                raise NonFiniteLossError(
                    f"non-finite loss at {where}, and {why}: the run has diverged and skipping "
                    "steps cannot recover it; lower the learning rate or resume from an "
                    "earlier checkpoint"
                )
            log.warning("non-finite loss at %s: step skipped", where)
            self.skipped_steps += 1
            self._updating = True
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before step()"
                self.scheduler.step()
        else:
            self._updating = True
            self.skipped_in_a_row = 0
            if cfg.optim.clip_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None and number % cfg.ema.every_steps == 0:
                self.ema.update(self.model)
            self.scheduler.step()
        totals = self.epoch_totals  # with the position, so that a checkpoint holds both
        totals["loss"] += loss_sum / n * n
        totals["n"] += n
        totals["correct"] += correct if self.mixer is None else 0.0
        self.global_step += 1
        self.step_in_epoch += 1
        self._updating = False
        out = {"loss": loss_sum / n, "n": n, "skipped": bool(bad), "stop": bool(stop)}
        if self.mixer is None:
            out["correct"] = correct
        return out

    def _lr(self) -> float:
        for g in self.optimizer.param_groups:
            if g.get("lr_scale", 1.0) == 1.0:
                return float(g["lr"])
        return float(self.optimizer.param_groups[0]["lr"])

    def _train_epoch(self) -> dict[str, float]:
        cfg, info = self.cfg, self.info
        sampler = ShardedBatchSampler(
            len(self.bundle.train),
            cfg.train.batch_size,
            rank=info.rank,
            world_size=info.world_size,
            accum_steps=cfg.train.accum_steps,
            seed=cfg.seed,
            epoch=self.epoch,
            start_step=self.step_in_epoch,
            max_steps=cfg.train.max_steps_per_epoch,
        )
        loader = B.make_train_loader(
            self.bundle.train, sampler, cfg.data.workers, info.device.type == "cuda"
        )
        self.train_model.train()
        bar = None
        if cfg.log.progress and info.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.step_in_epoch,
                desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
                dynamic_ncols=True,
                leave=False,
            )
        if self.step_in_epoch == 0:  # else resumed mid-epoch: the totals came with last.pt
            self.epoch_totals = _fresh_totals()
        totals = self.epoch_totals
        self._before_workers()
        it = iter(loader)
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                try:
                    micro = [next(it) for _ in range(cfg.train.accum_steps)]
                except Exception:
                    if self._stop_requested:  # DataLoader workers died on the same Ctrl-C
                        raise KeyboardInterrupt from None
                    raise
                out = self._train_step(micro)  # adds to self.epoch_totals
                self._after_step(out, bar)
        finally:
            if bar is not None:
                bar.close()
            del it
        result = {"train_loss": totals["loss"] / max(totals["n"], 1)}
        if self.mixer is None:
            result["train_top1"] = 100.0 * totals["correct"] / max(totals["n"], 1)
        return result

    def _after_step(self, out: dict[str, Any], bar: Any) -> None:
        cfg = self.cfg
        lr = self.step_lr
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{lr:.3g}", refresh=False)
        if self.global_step % cfg.log.every_steps == 0 or self.global_step == 1:
            rec: dict[str, Any] = {
                "kind": "step",
                "step": self.global_step,
                "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
                "loss": out["loss"] if math.isfinite(out["loss"]) else None,
                "lr": lr,
                "wall_time_s": self.wall_time(),
            }
            if "correct" in out:
                rec["train_top1"] = 100.0 * out["correct"] / out["n"]
            if out["skipped"]:
                rec["skipped"] = True
            self.logger.log(rec)
        every = cfg.train.checkpoint_every_steps
        if out["stop"]:
            self.save()
            raise TrainingInterrupted(
                f"interrupted at step {self.global_step}", run_dir=self.run_dir
            )
        if every and self.global_step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
            self.save()
        for cb in self.callbacks:
            cb.on_step_end(self)

    def _before_workers(self) -> None:
        """Return the tuned heap's free memory before a loader forks its workers, which would
        otherwise each share it copy-on-write and so make the next step copy it
        (:func:`normfree.train.allocator.release_heap`)."""
        if self.cfg.data.workers > 0:
            release_heap()

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        cfg, info = self.cfg, self.info
        bs = cfg.data.eval_batch_size or max(1, cfg.train.batch_size // info.world_size)
        loader = B.make_eval_loader(
            self.bundle.val, bs, info.rank, info.world_size, cfg.data.workers, False
        )
        kw = {
            "info": info,
            "precision": cfg.train.precision,
            "channels_last": cfg.train.channels_last,
        }
        self._before_workers()
        raw = evaluate(self.model, loader, info.device, **kw)
        out = {f"val_{k}": v for k, v in raw.items() if k != "count"}
        if self.ema is not None:
            self._before_workers()
            ema = evaluate(self.ema.module, loader, info.device, **kw)
            out.update({f"ema_val_{k}": v for k, v in ema.items() if k != "count"})
        return out

    # ------------------------------------------------------------------------------- driver
    def _end_epoch(self, train_stats: dict[str, float], epoch_t0: float) -> None:
        cfg = self.cfg
        done = self.epoch + 1
        record: dict[str, Any] = {"kind": "epoch", "epoch": done, **train_stats}
        improved = False
        if done % cfg.train.eval_every_epochs == 0 or done == cfg.train.epochs:
            self.last_eval = self.evaluate()
            record.update(self.last_eval)
            key = cfg.train.best_metric
            if self.last_eval[key] > self.best[key] or not self.best["epoch"]:
                improved = True
            for k in ("val_top1", "ema_val_top1"):
                if k in self.last_eval:
                    self.best[k] = max(self.best[k], self.last_eval[k])
            if improved:
                self.best["epoch"] = done
        self.epoch, self.step_in_epoch = done, 0
        record.update(
            step=self.global_step,
            lr=self.step_lr,  # the rate of the epoch's last step
            epoch_time_s=time.perf_counter() - epoch_t0,
            wall_time_s=self.wall_time(),
        )
        self.logger.log(record)
        self.save(best=improved)
        self.logger.write_summary(self.summary("running"))
        if self.info.is_main:
            msg = f"epoch {done}/{cfg.train.epochs}  train_loss {record['train_loss']:.4f}"
            for k in ("val_top1", "val_loss", "ema_val_top1"):
                if k in record:
                    msg += f"  {k} {record[k]:.4g}"
            log.info(msg)

    def _kernel_choice(self) -> contextlib.AbstractContextManager:
        """``train.native_kernels`` for the span of :meth:`fit` on CPU (the previous choice is
        restored after it; built on entry if this machine has no cached build), else nothing."""
        choice = native_kernel_choice(self.cfg.train.native_kernels)
        if choice is None:
            return contextlib.nullcontext()
        if self.info.device.type != "cpu":
            log.info("train.native_kernels ignored: the native kernels run on CPU only")
            return contextlib.nullcontext()
        return native_kernels(choice)

    def _report_kernels(self, on: bool | None) -> None:
        """Say what ``train.native_kernels`` did (``on``: what :meth:`_kernel_choice` yielded,
        None where it chose nothing), and warn where ``optim.update_in_backward`` cannot run in
        the backward."""
        choice = native_kernel_choice(self.cfg.train.native_kernels)
        if on is not None and self.info.is_main:
            chosen = chosen_kernels(choice) or frozenset()
            state = "on" if on else "off (the build failed: see the warning above)"
            if on and not (_kernels_used_by(self.model) & chosen):
                layers = " or ".join(_KERNEL_LAYERS[k] for k in KERNELS if k in chosen)
                state = f"on (no {layers} layer in this model: no effect)"
            if not chosen:
                state = "off"
            log.info("native CPU kernels (%s): %s", _readable_choice(choice), state)
        if self.backward_update is None or not self.info.is_main:
            return
        # the extension is built lazily, at the first forward: resolve it now (a choice of
        # NORMFREE_NATIVE_KERNELS is built here), so that what is said is what will run
        if native_extension("scaled_ws") is not None:
            return
        requested = "scaled_ws" in chosen_kernels(choice) if choice is not None else (
            "scaled_ws" in environment_kernels())  # fmt: skip
        if requested:
            why = ("the native Scaled-WS kernels could not be built (see the warning above; "
                   "a C++ compiler with OpenMP is needed)")  # fmt: skip
        else:
            why = ("the native Scaled-WS kernels are off (set train.native_kernels=true or "
                   "NORMFREE_NATIVE_KERNELS=1)")  # fmt: skip
        log.warning(
            "optim.update_in_backward: %s, so the optimizer updates every weight as usual", why
        )

    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (from the resumed position) and return the summary."""
        with self._kernel_choice() as on:
            self._report_kernels(on)
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        restore = None
        if threading.current_thread() is threading.main_thread():
            restore = {
                sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
            }
        status = "failed"
        try:
            if self.info.is_main:
                log.info(
                    "training %s (%.2fM params) on %s: %d steps/epoch × %d epochs → %s",
                    self.cfg.model,
                    self.num_params / 1e6,
                    self.cfg.data.spec,
                    self.steps_per_epoch,
                    self.cfg.train.epochs,
                    self.run_dir,
                )
            while self.epoch < self.cfg.train.epochs:
                t0 = time.perf_counter()
                stats = self._train_epoch()
                self._end_epoch(stats, t0)
            status = "completed"
        except TrainingInterrupted:
            status = "interrupted"
            raise
        except KeyboardInterrupt:
            status = "interrupted"
            why = None
            if self._aborted:  # what the first signal's message promised
                why = "aborted by a second Ctrl-C / SIGTERM"
            elif self._updating or self.info.distributed:
                why = "interrupted inside a parameter update"
            if why is None:
                self.save()
                raise TrainingInterrupted(
                    f"interrupted at step {self.global_step}", run_dir=self.run_dir
                ) from None
            log.error("%s: last.pt not updated", why)
            raise TrainingInterrupted(
                f"{why} (last completed step: {self.global_step})", saved=False,
                run_dir=self.run_dir,
            ) from None
        finally:
            if restore is not None:
                for sig, handler in restore.items():
                    signal.signal(sig, handler)
            try:
                self.logger.write_summary(self.summary(status))
                self.logger.plot()
                self.logger.close()
            except OSError as e:  # never hide the error that ended the run (disk full...)
                if status == "completed":
                    raise
                log.warning("could not write the run summary: %s", e)
            finally:
                self.close()
        return self.summary(status)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """SIGINT (Ctrl-C) or SIGTERM (preemption, torchrun stopping workers): finish the step,
        write last.pt, stop. A second signal aborts at once."""
        if self._stop_requested:
            self._aborted = True
            raise KeyboardInterrupt
        self._stop_requested = True
        if self.info.is_main:
            log.warning(
                "%s: finishing this step, writing last.pt, then stopping "
                "(press Ctrl-C again to abort without saving)",
                signal.Signals(signum).name,
            )


def _fresh_totals() -> dict[str, float]:
    return {"loss": 0.0, "n": 0.0, "correct": 0.0}


# the layers each native kernel pair serves (normfree.nn.native.KERNELS)
_KERNEL_LAYERS = {"scaled_ws": "Scaled-WS", "tanh_gelu": "tanh-GELU"}


def _kernels_used_by(model: nn.Module) -> set[str]:
    """The native kernel pairs that ``model`` has layers for."""
    used = set()
    for module in model.modules():
        if isinstance(module, ScaledStdConv2d):
            used.add("scaled_ws")
        elif isinstance(module, TanhGELU):
            used.add("tanh_gelu")
    return used


def _readable_choice(choice: bool | tuple[str, ...] | None) -> str:
    """``train.native_kernels`` for a log line: ``all``, ``none`` or the names."""
    if choice is True:
        return "all"
    return ", ".join(choice) if choice else "none"


def train(
    cfg: Config,
    resume: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` (joining the torchrun process group if there is one) and return the run
    summary. ``resume`` is a run folder whose ``last.pt`` is continued (``cfg`` may differ from
    the checkpoint's config only in :func:`~normfree.train.run_folder.resume_overridable` keys);
    ``callbacks`` hook into the loop of both phases, training and ``train.finetune_epochs``
    (:class:`~normfree.train.callbacks.Callback`); ``overwrite`` lets a new run replace an
    earlier run's files in ``cfg.out_dir``."""
    cfg = checked_config(cfg)  # types and ranges, before anything is started or written
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    info = init_distributed(cfg.dist.backend, cfg.train.device, cfg.dist.timeout_s)
    try:
        try:
            trainer = Trainer(cfg, info, resume=resume, callbacks=callbacks, overwrite=overwrite)
        except RunAlreadyComplete as done:
            if not (done.finetune_pending or done.finetune_partial):
                raise
            summary = _read_summary(done.run_dir)
            summary["finetune"] = _finish_finetune(done, cfg, info, callbacks)
            cleanup_distributed(sync=True)
            return summary
        summary = trainer.fit()
        if cfg.train.finetune_epochs > 0 and summary.get("status") == "completed":
            finetune_cfg = finetune_config(cfg, trainer.run_dir, trainer.model)
            summary["finetune"] = Trainer(finetune_cfg, info, callbacks=callbacks).fit()
        cleanup_distributed(sync=True)
        return summary
    finally:
        cleanup_distributed()
        torch.set_num_threads(threads)  # leave the caller's process as it was
        torch.use_deterministic_algorithms(deterministic)


def _finish_finetune(
    done: RunAlreadyComplete, cfg: Config, info: DistInfo, callbacks: Sequence[Callback]
) -> dict[str, Any]:
    """``--resume RUN_DIR`` of a run whose training is complete but whose fine-tuning phase is
    not: that phase is what is left. One that wrote no checkpoint starts afresh, replacing what
    the attempt left in its folder (config.yaml, metrics.jsonl, summary.json: else the folder
    refuses the new attempt and no --resume could ever finish the run); one with a checkpoint
    continues from it. The resume's changes of the machine-level keys
    (:data:`~normfree.train.run_folder.RESUME_OVERRIDABLE`: device, threads, logging, ...)
    apply to that phase too; a recovery change (learning rate, schedule) is the main run's."""
    from normfree.train.config_io import config_diff, config_from_dict
    from normfree.train.run_folder import RESUME_OVERRIDABLE, resume_config

    changes = config_diff(done.config, cfg)
    changes.pop("out_dir", None)
    machine = {k: new for k, (_, new) in changes.items() if k.startswith(RESUME_OVERRIDABLE)}

    def with_machine(phase_cfg: Config) -> Config:
        tree = config_to_dict(phase_cfg)
        for key, value in machine.items():
            *sections, leaf = key.split(".")
            node = tree
            for part in sections:
                node = node[part]
            node[leaf] = value
        return config_from_dict(tree)

    ft_dir = done.run_dir / "finetune"
    if done.finetune_partial:
        ft_cfg = with_machine(resume_config(ft_dir, []))
        return Trainer(ft_cfg, info, resume=ft_dir, callbacks=callbacks).fit()
    with torch.device("meta"):  # for its metadata only (finetune_config)
        model = B.build_model(done.model_args or {})
    ft_cfg = finetune_config(with_machine(done.config), done.run_dir, model)
    return Trainer(ft_cfg, info, callbacks=callbacks, overwrite=True).fit()


def _finetune_phase(finetune: Path) -> str:
    """Where the fine-tuning phase in ``finetune`` (``RUN_DIR/finetune``) stands: ``pending``
    (no checkpoint yet), ``partial`` (its last.pt has trained fewer than its epochs) or
    ``complete``."""
    last = finetune / "last.pt"
    if not last.is_file():
        return "pending"
    state = load_checkpoint(last)
    done = int(state["position"]["epoch"])
    return "complete" if done >= checkpoint_config(state, last).train.epochs else "partial"


def _read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's ``summary.json`` (empty when it is missing or unreadable)."""
    import json

    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def finetune_config(cfg: Config, run_dir: Path, model: nn.Module) -> Config:
    """The second phase of reduced-resolution training (Touvron et al. 2019 "FixRes"; Masters
    et al. 2021, §5): start from the run's final weights and train ``train.finetune_epochs``
    more at ``train.finetune_size`` (default: the model's ``meta.recipe["finetune_size"]``, else
    its ``test_size``) with ``finetune_lr_scale`` × the peak lr, no warmup, into
    ``RUN_DIR/finetune`` (resume that folder with ``--resume RUN_DIR/finetune``)."""
    from normfree.train.config_io import copy_config

    meta = getattr(model, "meta", None)
    size = cfg.train.finetune_size
    if size is None and meta is not None:
        size = int(meta.recipe.get("finetune_size", meta.test_size))
    ft = copy_config(cfg)
    ft.init_from = str(Path(run_dir) / "last.pt")
    ft.init_use_ema = False
    ft.out_dir = str(Path(run_dir) / "finetune")
    ft.optim.lr = B.peak_lr(cfg) * cfg.train.finetune_lr_scale
    ft.schedule.warmup_epochs, ft.schedule.warmup_steps = 0.0, 0
    ft.train.epochs, ft.train.finetune_epochs = cfg.train.finetune_epochs, 0
    ft.data.image_size = ft.data.test_size = size
    return ft
