"""A run that cannot work is refused before it starts (no run folder is written), one that
diverges stops, and what a run logs is what it did: the rate a step used, valid JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from normfree.train import Config, ConfigError, NonFiniteLossError, train
from normfree.train.callbacks import Callback

SHORT = ["train.epochs=1", "train.max_steps_per_epoch=3", "train.batch_size=16"]


def test_a_config_changed_in_code_is_checked_as_a_file_is(make_cfg: Callable[..., Config]) -> None:
    cases = [
        (("optim", "name", "lamb"), r"'optim\.name': expected \{sgd"),
        (("optim", "lr", "fast"), r"'optim\.lr': expected float"),
        (("train", "epochs", 1.5), r"'train\.epochs': expected int"),
        (("train", "precision", "bf17"), r"'train\.precision'"),
        (("optim", "betas", (0.9, 1.5)), r"'optim\.betas' must be two numbers in \[0, 1\)"),
        (("optim", "eps", -1.0), r"'optim\.eps' must be > 0"),
    ]
    for (section, key, value), message in cases:
        cfg = make_cfg(*SHORT)
        setattr(getattr(cfg, section), key, value)
        with pytest.raises(ConfigError, match=message):
            train(cfg)
        assert not Path(cfg.out_dir).exists()
    with pytest.raises(ConfigError, match="config section 'train' must be a mapping"):
        train(Config(train="x"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"expected a normfree\.train\.Config, got dict"):
        train({"model": "nf_resnet_cifar20"})  # type: ignore[arg-type]


def test_an_empty_split_or_a_teacher_that_does_not_fit_is_refused_before_the_run(
    make_cfg: Callable[..., Config],
) -> None:
    cfg = make_cfg(*SHORT, "data.val_fraction=0.0005")
    with pytest.raises(ConfigError, match="its held-out split holds no images"):
        train(cfg)
    assert not Path(cfg.out_dir).exists()
    teacher = make_cfg(*SHORT, "data.spec=synthetic:num_classes=5,size=8,channels=1,n=32",
                       out="teacher")  # fmt: skip
    train(teacher)
    cfg = make_cfg(*SHORT, f"distill.teacher={teacher.out_dir}", out="student")
    with pytest.raises(ConfigError, match=r"teacher gives \(5,\) outputs .* data has 10 classes"):
        train(cfg)
    assert not Path(cfg.out_dir).exists()


def test_a_diverged_run_stops_even_when_it_skips_nonfinite_steps(
    make_cfg: Callable[..., Config],
) -> None:
    """lr 1e30 without AGC: the weights blow up (finite but huge) and every loss after is
    non-finite; the fifth skipped step in a row ends the run."""
    cfg = make_cfg("train.epochs=1", "train.max_steps_per_epoch=12", "train.batch_size=16",
                   "optim.lr=1e30", "optim.agc=false", "schedule.warmup_steps=0",
                   "train.skip_nonfinite=true")  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="so were the 4 steps before it"):
        train(cfg)
    summary = json.loads((Path(cfg.out_dir) / "summary.json").read_text())
    assert summary["status"] == "failed"


class _RecordLR(Callback):
    def __init__(self) -> None:
        self.used: list[float] = []

    def on_loss(self, trainer, step: int, loss: torch.Tensor) -> torch.Tensor:
        self.used.append(trainer.optimizer.param_groups[0]["lr"])
        return loss


def test_the_logged_rate_is_the_rate_the_step_used_and_the_json_is_valid(
    make_cfg: Callable[..., Config],
) -> None:
    cfg = make_cfg("train.epochs=1", "train.max_steps_per_epoch=5", "train.batch_size=16",
                   "schedule.warmup_steps=2", "log.every_steps=1", "ema.enabled=false")  # fmt: skip
    recorder = _RecordLR()
    train(cfg, callbacks=[recorder])
    lines = (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    logged = [r["lr"] for r in records if r["kind"] == "step"]
    assert logged == recorder.used and recorder.used[0] == 0.0 and recorder.used[1] > 0.0
    (epoch,) = [r for r in records if r["kind"] == "epoch"]
    assert epoch["lr"] == recorder.used[-1]
    text = (Path(cfg.out_dir) / "summary.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["best_ema_val_top1"] is None  # no EMA: no best EMA score


def test_init_from_without_its_head_or_without_ema_weights(
    make_cfg: Callable[..., Config],
) -> None:
    first = make_cfg(*SHORT, "ema.enabled=false", out="first")
    train(first)
    data = "data.spec=synthetic:num_classes=3,size=8,channels=1,n=32"
    cfg = make_cfg(*SHORT, data, f"init_from={first.out_dir}", out="other_classes")
    with pytest.raises(ConfigError, match=r"its classifier does not fit .* init_head=false"):
        train(cfg)
    done = train(make_cfg(*SHORT, data, f"init_from={first.out_dir}", "init_head=false",
                          out="new_head"))  # fmt: skip
    assert done["status"] == "completed"
    from normfree.checkpoints import CheckpointError

    cfg = make_cfg(*SHORT, f"init_from={first.out_dir}", "init_use_ema=true", out="ema")
    with pytest.raises(CheckpointError, match=r"has no EMA weights .* init_use_ema=false\)"):
        train(cfg)


def test_resume_takes_a_fixed_key_at_its_stored_value_and_refuses_another(
    make_cfg: Callable[..., Config],
) -> None:
    from normfree.train.run_folder import resume_config

    cfg = make_cfg(*SHORT)
    train(cfg)
    assert resume_config(cfg.out_dir, ["train.epochs=1", "optim.lr=0.3"]).optim.lr == 0.3
    with pytest.raises(ConfigError, match=r"cannot change 'train\.epochs' when resuming") as e:
        resume_config(cfg.out_dir, ["train.epochs=3"])
    # ... and says how to train with it: a new run from the weights
    assert f"init_from={Path(cfg.out_dir) / 'last.pt'} --out NEW_DIR" in str(e.value)
    with pytest.raises(ConfigError, match="cannot change 'out_dir' when resuming"):
        resume_config(cfg.out_dir, [f"out_dir={cfg.out_dir}_elsewhere"])
    with pytest.raises(ConfigError, match=r"'data\.randaugment' must be \[num_ops >= 0"):
        train(make_cfg(*SHORT, "data.randaugment=[-1,9]", out="bad_randaugment"))


def test_a_resumed_run_purges_tensorboards_events_after_its_checkpoint(tmp_path: Path) -> None:
    """The resumed logger opens TensorBoard with ``purge_step`` = the checkpoint's step + 1:
    its event file starts with a SessionLog START at that step, which makes TensorBoard drop
    the earlier file's events from there on (logged before the crash)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from normfree.train.run_logger import RunLogger

    for resume_step, steps in ((None, range(1, 7)), (3, range(4, 7))):
        logger = RunLogger(tmp_path, csv=False, plot=False, resume_step=resume_step)
        for step in steps:
            logger.log({"kind": "step", "step": step, "loss": float(step)})
        logger.close()
    first, resumed = sorted((tmp_path / "tensorboard").glob("events.*"))
    starts = [(e.step, e.session_log.status) for e in EventFileLoader(str(resumed)).Load()
              if e.HasField("session_log")]  # fmt: skip
    assert starts == [(4, 1)]  # SessionLog.START at step 4
    assert not any(e.HasField("session_log") for e in EventFileLoader(str(first)).Load())


def test_more_threads_than_cores_run_on_the_cores_with_a_warning(
    make_cfg: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    """train.threads=100000 crashed the OpenMP runtime (a segmentation fault) at the start;
    a config from a bigger machine (or resumed here) runs on this one's cores instead."""
    import os

    cores = os.cpu_count() or 1
    seen: list[int] = []

    class Threads(Callback):
        def on_step_end(self, trainer) -> None:  # type: ignore[no-untyped-def]
            seen.append(torch.get_num_threads())

    cfg = make_cfg(*SHORT, "train.threads=100000")
    with caplog.at_level("WARNING", logger="normfree.train"):
        train(cfg, callbacks=[Threads()])
    assert seen and set(seen) == {cores}
    assert f"train.threads=100000 is more than the {cores} cores: using {cores}" in caplog.text


def test_a_second_ctrl_c_aborts_without_saving(
    make_cfg: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first SIGINT says "press Ctrl-C again to abort without saving"; a second one while
    the stop's last.pt is being written (a slow disk) made the run write last.pt once more
    instead of aborting, and the CLI said "last.pt written" even where it was not."""
    import os
    import signal

    from normfree.train import TrainingInterrupted, load_checkpoint
    from normfree.train.loop import Trainer

    class CtrlC(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    saves: list[int] = []
    pressed: list[int] = []
    real_save = Trainer.save

    def save(self: Trainer, best: bool = False) -> None:
        saves.append(self.global_step)
        if self._stop_requested and not pressed:  # Ctrl-C again while last.pt is written
            pressed.append(self.global_step)
            os.kill(os.getpid(), signal.SIGINT)
        real_save(self, best)

    monkeypatch.setattr(Trainer, "save", save)
    cfg = make_cfg(*SHORT, "train.max_steps_per_epoch=6", "train.checkpoint_every_steps=2")
    with pytest.raises(TrainingInterrupted, match="aborted by a second") as stop:
        train(cfg, callbacks=[CtrlC()])
    assert not stop.value.saved and "last completed step: 4" in str(stop.value)
    assert stop.value.resume_folder() == Path(cfg.out_dir)  # the CLI names it, not "<run folder>"
    assert saves == [2, 4]  # the stop's save was started once and not repeated
    assert load_checkpoint(Path(cfg.out_dir) / "last.pt")["position"]["global_step"] == 2
    summary = json.loads((Path(cfg.out_dir) / "summary.json").read_text())
    assert summary["status"] == "interrupted"


def test_a_resume_on_another_machine_may_change_how_a_step_is_computed(
    make_cfg: Callable[..., Config],
) -> None:
    """``train.compile`` (a machine without a compiler), ``train.grad_checkpointing``,
    ``train.channels_last`` and ``data.eval_batch_size`` (less memory), ``train.deterministic``
    and ``train.checkpoint_every_steps`` (a preemptible job) were refused on resume ("cannot
    change ... when resuming"), so a run moved to a smaller machine could not be continued."""
    from faults import CrashAfter, InjectedCrash

    from normfree.train import load_checkpoint
    from normfree.train.run_folder import resume_config

    cfg = make_cfg("train.epochs=2", "train.max_steps_per_epoch=3", "train.batch_size=16")
    with pytest.raises(InjectedCrash):
        train(cfg, callbacks=[CrashAfter(4)])
    changes = ["train.compile=false", "train.grad_checkpointing=true", "train.channels_last=true",
               "data.eval_batch_size=7", "train.deterministic=true",
               "train.checkpoint_every_steps=1"]  # fmt: skip
    resumed = resume_config(cfg.out_dir, changes)
    assert resumed.train.checkpoint_every_steps == 1 and resumed.data.eval_batch_size == 7
    assert train(resumed, resume=cfg.out_dir)["steps"] == 6
    history = [json.loads(x) for x in (Path(cfg.out_dir) / "config_history.jsonl").open()]
    assert set(history[-1]["changes"]) == {
        "train.grad_checkpointing", "train.channels_last", "data.eval_batch_size",
        "train.deterministic", "train.checkpoint_every_steps",
    }  # fmt: skip
    stored = load_checkpoint(Path(cfg.out_dir) / "last.pt")["config"]
    assert stored["train"]["grad_checkpointing"] and stored["data"]["eval_batch_size"] == 7


def test_a_batch_the_processes_cannot_split_is_refused_before_anything_is_written(
    make_cfg: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--nproc 3`` with the digits batch of 64 spawned three workers, rank 0 wrote
    config.yaml, metrics.jsonl, summary.json and tensorboard/ into the run folder, and only then
    did every worker stop ("must be divisible by world_size × accum_steps"), so the corrected
    command was refused by its own folder ("already holds an earlier run")."""
    from normfree.cli import main
    from normfree.train.distributed import DistInfo
    from normfree.train.loop import Trainer

    run = tmp_path / "three"
    argv = ["train", "--nproc", "3", "--out", str(run), "train.device=cpu", "train.accum_steps=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (
        "'train.batch_size' must be divisible by processes × train.accum_steps = 3 × 2 = 6, "
        "got 64; use e.g. 60 or 66" in err
    )
    assert not run.exists()
    cfg = make_cfg(*SHORT, out="torchrun")  # each process of a torchrun job refuses it too
    with pytest.raises(ConfigError, match=r"= 3 × 1 = 3, got 16; use e\.g\. 15 or 18"):
        Trainer(cfg, DistInfo(rank=0, world_size=3))
    assert not Path(cfg.out_dir).exists()


def test_resuming_a_run_that_wrote_no_checkpoint_says_how_to_start_it_again(
    make_cfg: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--resume`` of a run stopped before its first last.pt said only "no checkpoint file";
    it now names the command that starts the run again (the parent's ``--resume`` for a
    fine-tuning phase), and that command works."""
    from faults import CrashAfter, InjectedCrash

    from normfree.cli import main

    cfg = make_cfg(*SHORT)
    with pytest.raises(InjectedCrash):
        train(cfg, callbacks=[CrashAfter(1)])
    run = Path(cfg.out_dir)
    assert not (run / "last.pt").exists() and (run / "config.yaml").is_file()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    again = f"start it again: normfree train --config {run / 'config.yaml'} --overwrite"
    assert err.count("\n") == 1 and "no checkpoint file" in err and again in err
    assert main(again.split("normfree ")[1].split()) == 0 and (run / "last.pt").is_file()
    capsys.readouterr()
    (run / "finetune").mkdir()
    assert main(["train", "--resume", str(run / "finetune")]) == 2
    assert f"start it again with --resume {run}" in capsys.readouterr().err


class _NaNFrom(Callback):
    """Non-finite losses from optimizer step ``first`` (1-based) on; with ``crash_after``, an
    injected crash after that step (nothing saved but the periodic last.pt)."""

    def __init__(self, first: int, crash_after: int | None = None) -> None:
        self.first, self.crash_after = first, crash_after

    def on_loss(self, trainer, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step >= self.first else loss

    def on_step_end(self, trainer) -> None:
        if trainer.global_step == self.crash_after:
            from faults import InjectedCrash

            raise InjectedCrash("simulated crash")


def test_the_skipped_steps_in_a_row_count_across_a_resume(
    make_cfg: Callable[..., Config],
) -> None:
    """With train.skip_nonfinite the fifth non-finite step in a row ends the run; the count
    was not in last.pt, so a run resumed in the middle of such a streak started counting
    again and trained on past the step where the uninterrupted run stopped."""
    from faults import InjectedCrash

    from normfree.train.run_folder import resume_config

    run = ["train.epochs=1", "train.max_steps_per_epoch=10", "train.batch_size=16",
           "train.skip_nonfinite=true", "train.checkpoint_every_steps=1"]  # fmt: skip
    ref = make_cfg(*run, out="ref")
    with pytest.raises(NonFiniteLossError, match=r"at step 7 .*so were the 4 steps before it"):
        train(ref, callbacks=[_NaNFrom(3)])  # steps 3, 4, 5, 6, 7 skipped: stops at 7
    cfg = make_cfg(*run)
    with pytest.raises(InjectedCrash):
        train(cfg, callbacks=[_NaNFrom(3, crash_after=4)])
    with pytest.raises(NonFiniteLossError, match=r"at step 7 .*so were the 4 steps before it"):
        train(resume_config(cfg.out_dir, []), resume=cfg.out_dir, callbacks=[_NaNFrom(3)])


def test_grad_checkpointing_on_a_model_without_blocks_is_one_line(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    """A model made by ``normfree convert`` has no ``set_grad_checkpointing``:
    ``train.grad_checkpointing=true`` ended in an AttributeError traceback."""
    from normfree.convert import convert_model, save_converted
    from normfree.convert.experiment import bn_resnet_small

    kwargs = {"num_classes": 10, "in_chans": 1, "width": 4}
    bn = bn_resnet_small(**kwargs)
    bn.train()(torch.randn(4, 1, 8, 8))
    source = "normfree.convert.experiment:bn_resnet_small"
    save_converted(convert_model(bn.eval(), "bn_free", source=source, source_kwargs=kwargs),
                   tmp_path / "bn_free.safetensors")  # fmt: skip
    cfg = make_cfg(*SHORT, f"model=converted:{tmp_path / 'bn_free.safetensors'}",
                   "train.grad_checkpointing=true")  # fmt: skip
    with pytest.raises(ConfigError, match=r"set train\.grad_checkpointing=false$"):
        train(cfg)
    assert not Path(cfg.out_dir).exists()


def test_an_interrupted_finetune_is_continued_through_its_run(tmp_path: Path) -> None:
    """The Ctrl-C message said "--resume <run folder>"; it names the folder, and for the
    fine-tuning phase the run's own (``--resume RUN`` continues that phase, also before its
    first checkpoint, where ``RUN/finetune`` has no last.pt)."""
    from normfree.train import TrainingInterrupted

    run = tmp_path / "run"
    (run / "finetune").mkdir(parents=True)
    assert TrainingInterrupted("x", run_dir=run).resume_folder() == run
    assert TrainingInterrupted("x", run_dir=run / "finetune").resume_folder() == run / "finetune"
    (run / "last.pt").write_bytes(b"")
    assert TrainingInterrupted("x", run_dir=run / "finetune").resume_folder() == run
    assert TrainingInterrupted("x").resume_folder() is None
