"""Data-parallel training with gloo on CPU. Normalizer-free models have no batch statistics and
every global batch holds the same examples whatever the world size, so 2 processes over global
batch B end where 1 process over B ends (up to float summation order); a torchrun run killed
mid-epoch and resumed with ``--nproc 2`` ends exactly where the uninterrupted 2-process run does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from faults import FAULTY_CLI

from normfree.train import Config, load_checkpoint, train

QUIET = ["log.progress=false", "log.tensorboard=false", "log.plot=false", "train.threads=1"]
# pad-crop augmentation is drawn per example, so it is rank-consistent; no dropout/stochdepth
DDP_RUN = [
    "train.epochs=2",
    "train.max_steps_per_epoch=3",
    "train.batch_size=32",
    "schedule.warmup_steps=2",
    "train.checkpoint_every_steps=2",
]


@pytest.mark.distributed
def test_two_processes_match_one_and_resume_exactly(
    tmp_path: Path,
    make_cfg: Callable[..., Config],
    run_cli: Callable,
    final_weights: Callable,
    assert_same_weights: Callable,
) -> None:
    single = make_cfg(*DDP_RUN, out="single")
    train(single)
    ddp = tmp_path / "ddp"
    done = run_cli("train", "--nproc", "2", "--out", str(ddp), *QUIET, *DDP_RUN, timeout=180)
    assert done.returncode == 0, done.stderr
    one, two = final_weights(Path(single.out_dir)), final_weights(ddp)
    for part in ("model", "ema"):
        for k, v in one[part].items():
            torch.testing.assert_close(two[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")
    state = load_checkpoint(ddp / "last.pt")
    assert len(state["rng"]) == 2 and state["position"]["world_size"] == 2
    # torchrun, killed (simulated) after step 5 → last.pt of step 4 (mid-epoch 2); resume
    crashed = tmp_path / "crashed"
    res = run_cli(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        FAULTY_CLI,
        "train",
        "--out",
        str(crashed),
        *QUIET,
        *DDP_RUN,
        timeout=180,
        python_module=True,
        faults="crash_after=5",
    )
    assert res.returncode != 0 and "simulated crash" in res.stderr
    pos = load_checkpoint(crashed / "last.pt")["position"]
    assert (pos["epoch"], pos["step_in_epoch"], pos["global_step"]) == (1, 1, 4)
    resumed = run_cli("train", "--nproc", "2", "--resume", str(crashed), timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(final_weights(ddp), final_weights(crashed))
