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
from run_options import QUIET

from normfree.train import Config, load_checkpoint, train

# pad-crop augmentation is drawn per example, so it is rank-consistent; no dropout/stochdepth
DDP_RUN = [
    "train.epochs=2",
    "train.max_steps_per_epoch=3",
    "train.batch_size=32",
    "schedule.warmup_steps=2",
    "train.checkpoint_every_steps=2",
]


def _two_process_run(run_cli: Callable, out: Path) -> Path:
    done = run_cli("train", "--nproc", "2", "--out", str(out), *QUIET, *DDP_RUN, timeout=180)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.distributed
@pytest.mark.slow  # two spawned processes, 9–12 s: with the slow tests (default run < 5 min)
def test_two_processes_match_one(
    tmp_path: Path,
    make_cfg: Callable[..., Config],
    run_cli: Callable,
    final_weights: Callable,
) -> None:
    single = make_cfg(*DDP_RUN, out="single")
    train(single)
    ddp = _two_process_run(run_cli, tmp_path / "ddp")
    one, two = final_weights(Path(single.out_dir)), final_weights(ddp)
    for part in ("model", "ema"):
        for k, v in one[part].items():
            torch.testing.assert_close(two[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")
    state = load_checkpoint(ddp / "last.pt")
    assert len(state["rng"]) == 2 and state["position"]["world_size"] == 2


# three multi-process runs: with the slow tests (keeps the default run < 5 min); the default
# run covers kill-and-resume in one process (test_resume_subprocess.py); DDP runs with -m slow
@pytest.mark.distributed
@pytest.mark.slow
def test_killed_torchrun_resumes_exactly(
    tmp_path: Path,
    run_cli: Callable,
    final_weights: Callable,
    assert_same_weights: Callable,
) -> None:
    ddp = _two_process_run(run_cli, tmp_path / "ddp")
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


def _spawned_workers(pid: int) -> list[int]:
    """Child processes of ``pid`` started by multiprocessing's spawn (not its resource
    tracker)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    out = []
    for child in children:
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            out.append(child)
    return out


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_dying_worker_is_named_by_the_launcher(tmp_path: Path) -> None:
    """``--nproc 2`` with one worker killed (SIGKILL, as the OOM killer would): the launcher
    says which rank died and how, stops the other and exits non-zero."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "normfree", "train", "--nproc", "2", "--out", str(run), *QUIET,
         "train.epochs=50", "train.batch_size=32"],
        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 150
    while not (run / "metrics.jsonl").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    workers = _spawned_workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "was killed by SIGKILL" in line[0], err
    assert "worker rank 0 of 2" in line[0] or "worker rank 1 of 2" in line[0]
    assert not any(Path(f"/proc/{w}").exists() for w in workers)
