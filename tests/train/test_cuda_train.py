"""Device checks of the training system (see tests/test_cuda.py): a resume onto a fused CUDA
AdamW, exact kill-and-resume with ``train.deterministic=true``, and mixed precision with AGC.
Skipped without a CUDA device; ``NORMFREE_TEST_ACCEL=cpu`` runs them on the CPU."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from faults import CrashAfter, InjectedCrash

from normfree.train import Config, config_from_dict, load_checkpoint, train


def test_resume_onto_a_fused_adamw_on_accel(
    make_cfg: Callable[..., Config],
    random_run: list[str],
    final_weights: Callable,
    accel: torch.device,
) -> None:
    """A checkpoint written by the per-tensor AdamW resumes onto the fused kernel
    (``optim.fused=true``): ``load_state_dict`` places Adam's ``step`` by the loaded groups'
    ``fused`` flag, so this process's flag must reach them first (else ``step`` stays on the
    CPU and the fused CUDA kernel refuses it). The resumed run used the fused kernel and ends
    where an uninterrupted run ends, within the rounding that separates the two kernels
    (deterministic kernels: Adam turns CUDA's run-to-run noise in near-zero gradients into
    ±lr)."""
    run = [*random_run, "optim.name=adamw", "optim.lr=0.002", f"train.device={accel}",
           "train.deterministic=true"]  # fmt: skip
    ref = make_cfg(*run, "optim.fused=false", out="ref")
    train(ref)
    crashed = make_cfg(*run, "optim.fused=false", out="crashed")
    with pytest.raises(InjectedCrash):
        train(crashed, callbacks=[CrashAfter(7)])
    saved = load_checkpoint(Path(crashed.out_dir) / "last.pt")["config"]
    fused = config_from_dict({**saved, "optim": {**saved["optim"], "fused": True}})
    summary = train(fused, resume=crashed.out_dir)
    assert summary["status"] == "completed" and summary["steps"] == 10
    groups = load_checkpoint(Path(crashed.out_dir) / "last.pt")["optimizer"]["param_groups"]
    assert all(g["fused"] for g in groups)  # the resumed steps ran the fused kernel
    a, b = final_weights(Path(ref.out_dir)), final_weights(Path(crashed.out_dir))
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=key: f"{k}: {m}")  # fmt: skip


def test_kill_and_resume_on_accel_is_exact_when_deterministic(
    make_cfg: Callable[..., Config],
    random_run: list[str],
    final_weights: Callable,
    assert_same_weights: Callable,
    accel: torch.device,
) -> None:
    """``train.deterministic=true`` on the accelerator: every op of an NF model's step has a
    deterministic kernel there, and a run killed after step 7 and resumed ends bit-equal to
    an uninterrupted one."""
    run = [*random_run, "train.deterministic=true", f"train.device={accel}"]
    ref = make_cfg(*run, out="ref")
    train(ref)
    crashed = make_cfg(*run, out="crashed")
    with pytest.raises(InjectedCrash):
        train(crashed, callbacks=[CrashAfter(7)])
    summary = train(config_from_dict(load_checkpoint(Path(crashed.out_dir) / "last.pt")["config"]),
                    resume=crashed.out_dir)  # fmt: skip
    assert summary["steps"] == 10
    assert_same_weights(final_weights(Path(ref.out_dir)), final_weights(Path(crashed.out_dir)))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_with_agc_on_accel_learns(
    make_cfg: Callable[..., Config], accel: torch.device, precision: str
) -> None:
    """Three short epochs on digits under autocast learn: every step finite, validation
    accuracy above 40 % (chance is 10 %; fp32 reaches 55 % on the CPU, 67 % on an H200).
    fp16 runs the fused SGD under a ``GradScaler`` (checked in the checkpoint). A smoke test:
    too coarse to catch AGC clipping the still-scaled gradients (emulated on the CPU, that
    still reaches 48 %); test_cuda.py's fused-optimizer ``GradScaler`` test checks that."""
    if accel.type == "cpu" and precision == "fp16":
        pytest.skip("CPU autocast is bf16")
    common = ["train.epochs=3", f"train.device={accel}"]
    fp32 = train(make_cfg(*common, out="fp32"))
    cfg = make_cfg(*common, f"train.precision={precision}", out=precision)
    low = train(cfg)
    records = [json.loads(x) for x in (Path(cfg.out_dir) / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if r["kind"] == "step"]
    assert losses and all(v == v and abs(v) < 1e3 for v in losses)
    assert low["status"] == "completed"
    assert fp32["val_top1"] > 40.0 and low["val_top1"] > 40.0
    state = load_checkpoint(Path(cfg.out_dir) / "last.pt")
    if precision == "fp16":
        assert state["scaler"]["scale"] < 2.0**16 or state["scaler"]["_growth_tracker"] > 0
        assert all(g["fused"] for g in state["optimizer"]["param_groups"])
