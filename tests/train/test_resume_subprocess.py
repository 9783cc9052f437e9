"""Killed runs continue exactly: a simulated crash, a real SIGKILL and Ctrl-C (SIGINT) in a
``python -m normfree train`` subprocess, then ``--resume``; the final weights (raw and EMA)
equal those of an uninterrupted run bit for bit (CPU, one thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faults import FAULTY_CLI
from run_options import QUIET

from normfree.train import Config, load_checkpoint, train


def _reference(make_cfg: Callable[..., Config], random_run: list[str]) -> Path:
    cfg = make_cfg(*random_run, out="reference")
    train(cfg)
    return Path(cfg.out_dir)


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.is_file():
            steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the run never reached step {step}")


@pytest.mark.slow  # a crash mid-run (injected from outside); SIGKILL covers resume by default
def test_simulated_crash_then_resume(
    tmp_path: Path,
    make_cfg: Callable,
    random_run: list[str],
    run_cli: Callable,
    final_weights: Callable,
    assert_same_weights: Callable,
) -> None:
    ref = _reference(make_cfg, random_run)
    run = tmp_path / "crashed"
    crashed = run_cli("train", "--out", str(run), *QUIET, *random_run, faults="crash_after=7")
    assert crashed.returncode == 3, crashed.stderr
    assert "simulated crash" in crashed.stderr
    assert load_checkpoint(run / "last.pt")["position"]["global_step"] == 6
    resumed = run_cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(final_weights(ref), final_weights(run))


# SIGKILL in the default run; Ctrl-C (SIGINT) with the slow tests (keeps the default run < 5 min)
@pytest.mark.parametrize(
    "sig",
    [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGKILL", "SIGINT"],
)
def test_killed_or_interrupted_then_resume(
    sig: signal.Signals,
    tmp_path: Path,
    make_cfg: Callable,
    random_run: list[str],
    run_cli: Callable,
    final_weights: Callable,
    assert_same_weights: Callable,
) -> None:
    ref = _reference(make_cfg, random_run)
    run = tmp_path / "killed"
    args = [
        "train",
        "--out",
        str(run),
        *QUIET,
        *random_run,
        "log.every_steps=1",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env["NORMFREE_TEST_FAULTS"] = "sleep=0.25"
    proc = subprocess.Popen(
        [sys.executable, FAULTY_CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _wait_for_step(proc, run / "metrics.jsonl", 5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    state = load_checkpoint(run / "last.pt")
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert state["position"]["global_step"] in (4, 6, 8)  # every 2 steps / epoch end
    else:
        assert proc.returncode == 130, err
        assert "last.pt written" in err and f"Continue with --resume {run}" in err
        # Ctrl-C saves at the step it interrupted, not at the last periodic checkpoint
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").open()]
        assert state["position"]["global_step"] == max(steps)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "interrupted"
    assert state["position"]["global_step"] < 10
    resumed = run_cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(final_weights(ref), final_weights(run))
