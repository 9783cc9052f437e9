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
    with pytest.raises(ConfigError, match=r"cannot change 'train\.epochs' when resuming"):
        resume_config(cfg.out_dir, ["train.epochs=3"])
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
