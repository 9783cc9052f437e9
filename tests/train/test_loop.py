"""End-to-end training on digits: the run folder, eval of raw/EMA weights, exact resume after a
simulated crash, NaN/Inf handling and the MixUp/CutMix loss."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from faults import CrashAfter, InjectedCrash, NaNAt

from normfree.cli import main
from normfree.data import BatchMixer, soft_target_cross_entropy
from normfree.optim import fused_available
from normfree.train import (
    Callback,
    CheckpointError,
    Config,
    ConfigError,
    NonFiniteLossError,
    Trainer,
    config_from_dict,
    load_checkpoint,
    train,
)
from normfree.train.builders import make_train_loader
from normfree.train.distributed import DistInfo, ShardedBatchSampler, example_seed

SUMMARY_KEYS = {
    "val_top1",
    "best_val_top1",
    "val_loss",
    "epochs",
    "steps",
    "wall_time_s",
    "model",
    "num_params",
    "ema_val_top1",
    "ema_val_loss",
    "best_ema_val_top1",
    "status",
}


def test_end_to_end_digits_run_folder_and_eval(
    make_cfg: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_cfg("train.epochs=3", "log.tensorboard=true", "log.plot=true")
    summary = train(cfg)
    run = Path(cfg.out_dir)
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "last.pt",
        "best.pt",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    on_disk = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk) and on_disk["status"] == "completed"
    assert on_disk["epochs"] == 3 and on_disk["steps"] == 3 * (1438 // 64)
    assert on_disk["model"] == "nf_resnet_cifar20" and on_disk["num_params"] > 100_000
    assert summary["val_top1"] > 40.0  # chance is 10%; ~55% after 3 short epochs
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and len(steps) >= 66 // 5
    assert epochs[-1]["val_top1"] == summary["val_top1"]
    # normfree eval reproduces the final raw and EMA metrics from last.pt
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(run / "last.pt"), "--json", str(out_json)]) == 0
    assert "top1" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert result["count"] == 359
    assert result["raw"]["top1"] == pytest.approx(summary["val_top1"], abs=1e-9)
    assert result["raw"]["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert result["ema"]["top1"] == pytest.approx(summary["ema_val_top1"], abs=1e-9)
    assert 0.0 <= result["raw"]["top1"] <= result["raw"]["top5"] <= 100.0
    # a finished run folder is not silently overwritten
    with pytest.raises(ConfigError, match="already holds an earlier run"):
        train(cfg)


def test_resume_after_simulated_crash_is_exact(
    make_cfg: Callable[..., Config],
    random_run: list[str],
    final_weights: Callable,
    assert_same_weights: Callable,
) -> None:
    ref = make_cfg(*random_run, out="ref")
    train(ref)
    crashed = make_cfg(*random_run, out="crashed")
    with pytest.raises(InjectedCrash):
        train(crashed, callbacks=[CrashAfter(7)])
    state = load_checkpoint(Path(crashed.out_dir) / "last.pt")
    assert state["position"] == {
        **state["position"],
        "epoch": 1,
        "step_in_epoch": 1,
        "global_step": 6,
    }
    resumed = config_from_dict(state["config"])
    summary = train(resumed, resume=crashed.out_dir)
    assert summary["steps"] == 10 and summary["status"] == "completed"
    assert_same_weights(final_weights(Path(ref.out_dir)), final_weights(Path(crashed.out_dir)))
    # metrics.jsonl reads like one run: steps after the checkpoint are not duplicated
    records = [json.loads(x) for x in (Path(crashed.out_dir) / "metrics.jsonl").open()]
    step_ids = [r["step"] for r in records if r["kind"] == "step"]
    assert step_ids == sorted(set(step_ids))


def test_resume_keeps_this_process_optimizer_kernel(
    make_cfg: Callable[..., Config], random_run: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint's param groups carry the ``fused`` flag of the run that wrote them; a
    resume keeps the kernel this process chose: where this PyTorch has no fused kernel
    (``optim.fused=null``), or when ``optim.fused`` changes on resume."""
    crashed = make_cfg(*random_run, out="crashed")
    with pytest.raises(InjectedCrash):
        train(crashed, callbacks=[CrashAfter(7)])
    state = load_checkpoint(Path(crashed.out_dir) / "last.pt")
    fused_here = fused_available(torch.optim.SGD, [torch.zeros(1)])
    assert [bool(g["fused"]) for g in state["optimizer"]["param_groups"]] == [fused_here] * len(
        state["optimizer"]["param_groups"]
    )
    saved = state["config"]
    # what the optimizer is handed to load: torch places state such as Adam's `step` by the
    # loaded groups' `fused` flag (on the parameters' device for a fused kernel), so this
    # process's flag must be in them before the load, not only restored after it
    loaded: list[dict] = []
    original_load = torch.optim.Optimizer.load_state_dict

    def recording_load(self, state_dict):
        loaded.append(state_dict)
        return original_load(self, state_dict)

    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", recording_load)
    with monkeypatch.context() as patch:  # a PyTorch without the fused kernel, same config
        patch.setattr("normfree.train.builders.fused_available", lambda *_: False)
        unchanged = config_from_dict(saved)
        trainers = [Trainer(unchanged, DistInfo(), resume=crashed.out_dir)]
    trainers[0].close()
    changed = config_from_dict({**saved, "optim": {**saved["optim"], "fused": False}})
    trainers.append(Trainer(changed, DistInfo(), resume=crashed.out_dir))
    trainers[1].close()
    assert len(loaded) == 2
    for state_dict, trainer in zip(loaded, trainers):
        flags = [g["fused"] for g in state_dict["param_groups"]]
        assert flags == [g["fused"] for g in trainer.optimizer.param_groups]
        assert len(flags) == len(state["optimizer"]["param_groups"]) and not any(flags)
    for trainer in trainers:
        assert trainer.global_step == 6
        assert not any(g["fused"] for g in trainer.optimizer.param_groups)
        momentum = trainer.optimizer.state[trainer.optimizer.param_groups[0]["params"][0]]
        assert momentum["momentum_buffer"].abs().sum() > 0  # the state itself was loaded


def test_a_checkpoint_naming_an_unknown_model_is_one_line(
    make_cfg: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint of a model this normfree lacks (a newer version, a plugin) is refused in one
    line by every command that rebuilds its model, before anything runs."""
    cfg = make_cfg("train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=32")
    train(cfg)
    best = Path(cfg.out_dir) / "best.pt"
    state = torch.load(best, weights_only=True)
    state["model_args"]["name"] = "nf_resnet_from_the_future"
    foreign = Path(cfg.out_dir).parent / "foreign.pt"
    torch.save(state, foreign)
    student = str(Path(cfg.out_dir).parent / "student")
    teacher = [f"distill.teacher={foreign}", "train.epochs=1", "train.max_steps_per_epoch=2",
               "log.progress=false", "--out", student]  # fmt: skip
    for argv in (["eval", str(foreign)], ["train", *teacher]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert "Traceback" not in err and len(lines) == 1, err
        assert "unknown model 'nf_resnet_from_the_future'" in lines[0]


def test_resume_refuses_corrupt_or_missing_checkpoint(
    make_cfg: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_cfg("train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=32")
    train(cfg)
    last = Path(cfg.out_dir) / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(cfg, resume=cfg.out_dir)
    assert main(["train", "--resume", cfg.out_dir]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    last.unlink()
    assert main(["train", "--resume", cfg.out_dir]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    assert main(["train", "--resume", cfg.out_dir, "optim.momentum=0.5"]) == 2
    assert "cannot change 'optim.momentum'" in capsys.readouterr().err


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(
    make_cfg: Callable[..., Config], random_run: list[str]
) -> None:
    cfg = make_cfg(*random_run)
    with pytest.raises(NonFiniteLossError, match=r"at step 5 \(epoch 1, batch 5\)") as err:
        train(cfg, callbacks=[NaNAt(5)])
    assert "last good checkpoint is kept" in str(err.value)
    state = load_checkpoint(Path(cfg.out_dir) / "last.pt")
    assert state["position"]["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    summary = json.loads((Path(cfg.out_dir) / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 4


def test_nonfinite_loss_skipped_when_configured(
    make_cfg: Callable[..., Config], random_run: list[str]
) -> None:
    cfg = make_cfg(*random_run, "train.skip_nonfinite=true")
    summary = train(cfg, callbacks=[NaNAt(3)])
    assert summary["status"] == "completed" and summary["skipped_steps"] == 1
    assert summary["steps"] == 10
    state = load_checkpoint(Path(cfg.out_dir) / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert state["ema"]["num_updates"] == 9  # the skipped step did not update the EMA


def test_mixup_cutmix_loss_uses_mixed_soft_targets(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg(
        "data.mixup_alpha=0.4",
        "data.cutmix_alpha=1.0",
        "train.batch_size=16",
        "train.label_smoothing=0.1",
        "train.max_steps_per_epoch=1",
        "data.crop=none",
    )
    trainer = Trainer(cfg, DistInfo())
    before = copy.deepcopy(trainer.model)
    sampler = ShardedBatchSampler(len(trainer.bundle.train), 16, seed=cfg.seed, epoch=0)
    x, y = next(iter(make_train_loader(trainer.bundle.train, sampler, 0, False)))
    out = trainer._train_step([(x, y)])
    # the same mix, done by hand: generator seeded from (seed, step 1, micro-batch 0, rank 0)
    mixer = BatchMixer(10, mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1)
    xm, target = mixer(x, y, torch.Generator().manual_seed(example_seed(cfg.seed, 1, 0, 0)))
    assert torch.allclose(target.sum(1), torch.ones(16))
    assert target.min() >= 0.1 / 10 - 1e-7 and target.max() < 1.0  # smoothed after mixing
    expected = soft_target_cross_entropy(before.train()(xm).float(), target).item()
    assert out["loss"] == pytest.approx(expected, rel=1e-5)
    # with mixing disabled the loss is plain label-smoothed cross-entropy
    plain = Trainer(make_cfg("train.batch_size=16", "data.crop=none", out="plain"), DistInfo())
    ref = copy.deepcopy(plain.model).train()
    out = plain._train_step([(x, y)])
    expected = torch.nn.functional.cross_entropy(ref(x), y, label_smoothing=0.1).item()
    assert out["loss"] == pytest.approx(expected, rel=1e-5) and not math.isnan(out["loss"])


def test_native_kernels_setting_is_scoped_to_the_run(
    make_cfg: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    # train.native_kernels chooses the kernels for the span of fit (every step runs inside the
    # choice, which is undone when the run ends); null leaves the process's choice alone; a
    # resume may set it (the kernels themselves are tests/nn/test_native*.py)
    import contextlib

    import normfree.train.loop as loop
    from normfree.train.callbacks import Callback

    entered: list[object] = []
    inside = [False]

    @contextlib.contextmanager
    def spy(choice):  # records instead of building the extension
        entered.append(choice)
        inside[0] = True
        try:
            yield True
        finally:
            inside[0] = False

    class StepsInside(Callback):
        def __init__(self) -> None:
            self.seen: list[bool] = []

        def on_step_end(self, trainer) -> None:
            self.seen.append(inside[0])

    monkeypatch.setattr(loop, "native_kernels", spy)
    one_step = ("train.epochs=1", "train.max_steps_per_epoch=1")
    steps = StepsInside()
    train(make_cfg(*one_step, "train.native_kernels=tanh_gelu", out="chosen"), callbacks=[steps])
    assert entered == [("tanh_gelu",)] and steps.seen == [True] and not inside[0]
    steps = StepsInside()
    two_epochs = ("train.epochs=2", "train.max_steps_per_epoch=1")
    with pytest.raises(InjectedCrash):  # stopped in epoch 2: last.pt holds epoch 1
        train(make_cfg(*two_epochs, out="default"), callbacks=[steps, CrashAfter(2)])
    assert entered == [("tanh_gelu",)] and steps.seen == [False, False]
    # a resume may switch them on (they change rounding, not what was trained)
    run = make_cfg(*two_epochs, out="default").out_dir
    train(make_cfg(*two_epochs, "train.native_kernels=true", out="default"), resume=run)
    assert entered == [("tanh_gelu",), True]


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["train.native_kernels=[scaled_ws]"], "native CPU kernels (scaled_ws): on"),
        (["train.native_kernels=true"], "native CPU kernels (all): on"),
        (["model=bn_resnet_cifar20", "train.native_kernels=true"],
         "native CPU kernels (all): on (no Scaled-WS or tanh-GELU layer in this model: "
         "no effect)"),
        (["model=bn_resnet_cifar20", "train.native_kernels=scaled_ws"],
         "native CPU kernels (scaled_ws): on (no Scaled-WS layer in this model: no effect)"),
        (["train.native_kernels=false"], "native CPU kernels (none): off"),
    ],
)  # fmt: skip
def test_the_native_kernel_choice_is_reported_readably(
    overrides: list[str], line: str, make_cfg: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    import contextlib
    import logging

    import normfree.train.loop as loop

    @contextlib.contextmanager
    def built(choice):  # as if the extension were built (what is logged is under test)
        yield bool(choice)

    monkeypatch.setattr(loop, "native_kernels", built)
    one_step = ["train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=16"]
    with caplog.at_level(logging.INFO, logger="normfree"):
        train(make_cfg(*one_step, *overrides))
    assert [r.getMessage() for r in caplog.records if "native CPU" in r.getMessage()] == [line]


def test_curves_are_skipped_when_there_is_nothing_to_draw(tmp_path: Path) -> None:
    """A run that stops before its first record plots nothing (no file, and no matplotlib
    "No artists with labels" warning); a run with step records only has no empty legend."""
    import warnings

    from normfree.train.run_logger import plot_curves

    pytest.importorskip("matplotlib")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_curves([], tmp_path / "none.png") is False
        assert not (tmp_path / "none.png").exists()
        steps = [{"kind": "step", "step": 1, "loss": 2.3, "lr": 0.1}]
        assert plot_curves(steps, tmp_path / "steps.png") is True
    assert (tmp_path / "steps.png").is_file()


def test_a_mid_epoch_resume_keeps_the_epoch_train_metrics(
    make_cfg: Callable[..., Config], final_weights: Callable, assert_same_weights: Callable
) -> None:
    """Stopped at step 3 of 4 (last.pt at step 2) and resumed: the epoch's train_loss and
    train_top1 cover the whole epoch, as in the uninterrupted run; a checkpoint written before
    it held the running totals still resumes (its epoch covers the steps after the resume)."""
    run = ("train.epochs=1", "train.max_steps_per_epoch=4", "train.batch_size=32",
           "train.checkpoint_every_steps=2")  # fmt: skip

    def epoch_row(cfg: Config) -> dict:
        records = [json.loads(x) for x in (Path(cfg.out_dir) / "metrics.jsonl").open()]
        return next(r for r in records if r["kind"] == "epoch")

    ref = make_cfg(*run, out="ref")
    train(ref)
    crashed = make_cfg(*run, out="crashed")
    with pytest.raises(InjectedCrash):
        train(crashed, callbacks=[CrashAfter(3)])
    last = Path(crashed.out_dir) / "last.pt"
    old_style = torch.load(last, weights_only=True)
    assert old_style["position"]["step_in_epoch"] == 2
    train(crashed, resume=crashed.out_dir)
    assert_same_weights(final_weights(Path(ref.out_dir)), final_weights(Path(crashed.out_dir)))
    for key in ("train_loss", "train_top1"):
        assert epoch_row(crashed)[key] == epoch_row(ref)[key], key
    # a checkpoint without the totals (older versions) resumes as before
    older = make_cfg(*run, out="older")
    with pytest.raises(InjectedCrash):
        train(older, callbacks=[CrashAfter(3)])
    state = torch.load(Path(older.out_dir) / "last.pt", weights_only=True)
    del state["progress"]["epoch_totals"]
    torch.save(state, Path(older.out_dir) / "last.pt")
    train(older, resume=older.out_dir)
    assert_same_weights(final_weights(Path(ref.out_dir)), final_weights(Path(older.out_dir)))
    assert epoch_row(older)["train_loss"] != epoch_row(ref)["train_loss"]


class _LrLog(Callback):
    """The learning rate each optimizer step ran with, by global step."""

    def __init__(self) -> None:
        self.lr: dict[int, float] = {}

    def on_step_end(self, trainer: Trainer) -> None:
        self.lr[trainer.global_step] = trainer.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("change", ["schedule.decay_rate=0.5", "schedule.decay_epochs=0.2"])
def test_a_resume_that_changes_the_exponential_decay_follows_it(
    make_cfg: Callable[..., Config], change: str
) -> None:
    """Diverged-run recovery with a steeper exponential decay: the resume logged the new rate
    and period but kept stepping the checkpoint's (only the peak, warmup, length, final ratio
    and decay kind were taken over). From the checkpoint's step on, the learning rates equal a
    fresh run's with the new setting."""
    base = ["train.epochs=2", "train.max_steps_per_epoch=5", "train.batch_size=32",
            "schedule.warmup_steps=1", "schedule.decay=exponential", "schedule.decay_epochs=0.5",
            "schedule.decay_rate=0.9"]  # fmt: skip
    fresh_log = _LrLog()
    train(make_cfg(*base, change, out="fresh"), callbacks=[fresh_log])
    crashed = make_cfg(*base, out="crashed")
    with pytest.raises(InjectedCrash):
        train(crashed, callbacks=[CrashAfter(7)])
    state = load_checkpoint(Path(crashed.out_dir) / "last.pt")
    key, value = change.split("=")
    resumed = config_from_dict(state["config"])
    setattr(resumed.schedule, key.split(".")[1], float(value))
    resumed_log = _LrLog()
    train(resumed, resume=crashed.out_dir, callbacks=[resumed_log])
    steps = sorted(resumed_log.lr)
    assert steps[0] == state["position"]["global_step"] + 1 and steps[-1] == 10
    assert [resumed_log.lr[s] for s in steps] == pytest.approx([fresh_log.lr[s] for s in steps])
    old = _LrLog()  # (and they differ from the checkpoint's schedule: the change shows)
    train(make_cfg(*base, out="old"), callbacks=[old])
    assert [old.lr[s] for s in steps] != pytest.approx([fresh_log.lr[s] for s in steps])
