"""Recipe hints and weight initialisation: MSR from the model's metadata, ``init_from``
fine-tuning, and the reduced-resolution train-then-fine-tune option (Masters et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from faults import InjectedCrash

from normfree.nn.msr import kernel_slice_means
from normfree.optim import AGC, MeanShiftRejection, attached
from normfree.train import (
    Callback,
    Config,
    ConfigError,
    RunAlreadyComplete,
    Trainer,
    load_checkpoint,
    train,
)
from normfree.train import builders as B
from normfree.train.run_folder import resume_config
from normfree.train.run_logger import read_metrics

SHORT = ["train.epochs=1", "train.max_steps_per_epoch=4", "train.batch_size=32"]


def test_msr_models_get_the_projection_and_stay_zero_mean(
    make_cfg: Callable[..., Config],
) -> None:
    cfg = make_cfg("model=msr_resnet_cifar20", *SHORT)
    model = B.build_model(B.model_args(cfg, 10, 1))
    opt = B.build_optimizer(cfg, model)
    assert [type(a) for a in attached(opt)] == [MeanShiftRejection]
    train(cfg)
    state = load_checkpoint(Path(cfg.out_dir) / "last.pt")["model"]
    k3 = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 4 and v.shape[-1] == 3]
    assert k3 and max(kernel_slice_means(w).abs().max().item() for w in k3) < 1e-6
    # an NF model takes AGC and no MSR unless asked
    nf = make_cfg(*SHORT)
    nf_opt = B.build_optimizer(nf, B.build_model(B.model_args(nf, 10, 1)))
    assert [type(a) for a in attached(nf_opt)] == [AGC]
    forced = make_cfg(*SHORT, "optim.msr=true", "optim.name=adamw")
    forced_opt = B.build_optimizer(forced, B.build_model(B.model_args(forced, 10, 1)))
    (msr,) = [a for a in attached(forced_opt) if isinstance(a, MeanShiftRejection)]
    assert msr.mode == "project_update"


def test_init_from_loads_raw_or_ema_weights(make_cfg: Callable[..., Config]) -> None:
    first = make_cfg(*SHORT, out="first")
    train(first)
    ckpt = load_checkpoint(Path(first.out_dir) / "best.pt")
    for use_ema, expected in ((False, ckpt["model"]), (True, ckpt["ema"]["module"])):
        cfg = make_cfg(*SHORT, f"init_from={first.out_dir}", f"init_use_ema={str(use_ema).lower()}")
        model = B.build_model(B.model_args(cfg, 10, 1))
        B.init_weights_from(cfg, model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, expected[k]), k


def test_reduced_resolution_then_finetune(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg(*SHORT, "train.finetune_epochs=1", "train.finetune_size=12")
    summary = train(cfg)
    ft_dir = Path(cfg.out_dir) / "finetune"
    assert summary["status"] == "completed" and summary["finetune"]["status"] == "completed"
    ft_cfg = yaml.safe_load((ft_dir / "config.yaml").read_text())
    assert ft_cfg["data"]["image_size"] == 12 and ft_cfg["data"]["test_size"] == 12
    assert ft_cfg["init_from"] == str(Path(cfg.out_dir) / "last.pt")
    assert ft_cfg["train"]["finetune_epochs"] == 0 and ft_cfg["schedule"]["warmup_steps"] == 0
    peak = B.peak_lr(cfg)
    assert abs(ft_cfg["optim"]["lr"] - 0.1 * peak) < 1e-12
    assert (ft_dir / "last.pt").is_file() and 0 <= summary["finetune"]["val_top1"] <= 100


class _CrashInFinetune(Callback):
    """Stop the fine-tuning phase after its first step, before it writes a checkpoint."""

    def __init__(self) -> None:
        self.main_steps = 0

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.run_dir.name != "finetune":
            self.main_steps += 1
        elif trainer.global_step == 1:
            raise InjectedCrash("simulated crash in the fine-tuning phase")


def test_a_finetune_stopped_before_its_first_checkpoint_resumes(
    make_cfg: Callable[..., Config],
) -> None:
    """The callbacks reach the fine-tuning phase too, and a fine-tuning phase that ended before
    its first last.pt (config.yaml and metrics.jsonl written) is started again by ``--resume
    RUN_DIR``: that folder refused the new attempt ("already holds an earlier run"), and
    ``--resume RUN_DIR/finetune`` has no last.pt, so no resume could finish the run."""
    cfg = make_cfg(*SHORT, "train.finetune_epochs=1", "train.finetune_size=12")
    crash = _CrashInFinetune()
    with pytest.raises(InjectedCrash):
        train(cfg, callbacks=[crash])
    run, ft_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "finetune"
    assert crash.main_steps == 4 and not (ft_dir / "last.pt").exists()
    assert (ft_dir / "config.yaml").is_file() and (ft_dir / "metrics.jsonl").is_file()
    summary = train(resume_config(run, ["log.every_steps=2"]), resume=run)
    assert summary["finetune"]["status"] == "completed" and summary["finetune"]["steps"] == 4
    state = load_checkpoint(ft_dir / "last.pt")
    assert state["position"]["epoch"] == 1 and state["config"]["log"]["every_steps"] == 2
    steps = [r["step"] for r in read_metrics(ft_dir / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == sorted(set(steps))  # the first attempt's records were replaced


def test_init_from_a_run_folder_without_best_pt_takes_its_last_pt(
    make_cfg: Callable[..., Config],
) -> None:
    """A run stopped before its first evaluation has last.pt only: ``init_from=RUN`` said
    "checkpoint not found: RUN/best.pt", where ``normfree eval RUN`` and ``distill.teacher=RUN``
    take that last.pt."""
    first = make_cfg(*SHORT, out="first")
    train(first)
    (Path(first.out_dir) / "best.pt").unlink()
    expected = load_checkpoint(Path(first.out_dir) / "last.pt")["model"]
    cfg = make_cfg(*SHORT, f"init_from={first.out_dir}")
    model = B.build_model(B.model_args(cfg, 10, 1))
    B.init_weights_from(cfg, model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


class _CrashInFinetuneAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.run_dir.name == "finetune" and trainer.global_step == self.step:
            raise InjectedCrash(f"simulated crash at fine-tuning step {self.step}")


def test_resume_of_the_run_continues_its_interrupted_finetune_exactly(
    make_cfg: Callable[..., Config],
) -> None:
    """``--resume RUN_DIR`` of a run whose fine-tuning phase was interrupted after a checkpoint
    printed "already complete" and exited 0, so a preemption-restart loop ended with the
    fine-tuning half done; it now continues that phase, to the weights of an uninterrupted
    run."""
    overrides = (*SHORT, "train.finetune_epochs=1", "train.finetune_size=12",
                 "train.checkpoint_every_steps=2")  # fmt: skip
    ref = make_cfg(*overrides, out="ref")
    train(ref)
    cfg = make_cfg(*overrides)
    with pytest.raises(InjectedCrash):
        train(cfg, callbacks=[_CrashInFinetuneAt(3)])
    run, ft_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "finetune"
    assert load_checkpoint(ft_dir / "last.pt")["position"]["global_step"] == 2
    # a machine-level change of the resume reaches the fine-tuning phase too
    summary = train(resume_config(run, ["log.every_steps=1"]), resume=run)
    assert summary["finetune"]["status"] == "completed" and summary["finetune"]["steps"] == 4
    got = load_checkpoint(ft_dir / "last.pt")
    assert got["config"]["log"]["every_steps"] == 1
    want = load_checkpoint(Path(ref.out_dir) / "finetune" / "last.pt")
    for part in ("model", "ema"):
        a, b = (got[part] if part == "model" else got[part]["module"],
                want[part] if part == "model" else want[part]["module"])  # fmt: skip
        assert all(torch.equal(a[k], b[k]) for k in b), part
    with pytest.raises(RunAlreadyComplete, match=r"its fine-tuning phase .* too"):
        train(resume_config(run, []), resume=run)  # both phases done: nothing to train


def test_a_finetune_size_below_the_models_minimum_is_refused_before_training(
    make_cfg: Callable[..., Config],
) -> None:
    """It was refused only when the fine-tuning phase started, after the whole main run, as
    "data.image_size=2", and could not be changed on resume: the run could never finish."""
    cfg = make_cfg(*SHORT, "train.finetune_epochs=1", "train.finetune_size=2")
    with pytest.raises(ConfigError, match=r"^train\.finetune_size=2: 2x2 inputs are below"):
        train(cfg)
    assert not Path(cfg.out_dir).exists()


def test_the_command_prints_the_fine_tuned_result_too(tmp_path: Path, capsys) -> None:
    """With ``train.finetune_epochs`` the command printed only the first phase's result; the
    fine-tuned model's is what the run is for, so it gets its own line."""
    import json

    from run_options import QUIET

    from normfree.cli import main

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *QUIET, *SHORT, "train.finetune_epochs=1",
                 "train.finetune_size=12"]) == 0  # fmt: skip
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("val_top1")]
    ft = json.loads((run / "finetune" / "summary.json").read_text())
    assert len(lines) == 2 and lines[0].endswith(f"run folder {run}")
    assert lines[1].startswith(f"val_top1 {ft['val_top1']:.2f}%")
    assert lines[1].endswith(f"fine-tuned at 12 px, in {run / 'finetune'}")
