"""Shared helpers for the training-system tests: small, fast digits configurations."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from normfree.train import Config, resolve_config

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # faults.py (fault-injection callbacks), run_options.py
from faults import FAULTY_CLI  # noqa: E402  (python -m normfree with NORMFREE_TEST_FAULTS)
from run_options import QUIET  # noqa: E402

# a short run that exercises every random stream: per-example crop augmentation, MixUp/CutMix,
# dropout and stochastic depth; 2 epochs of 5 steps, last.pt every 2 steps
RANDOM_RUN = [
    "train.epochs=2",
    "train.max_steps_per_epoch=5",
    "train.batch_size=32",
    "train.drop_rate=0.2",
    "train.stochdepth_rate=0.1",
    "data.mixup_alpha=0.2",
    "data.cutmix_alpha=1.0",
    "schedule.warmup_steps=2",
    "train.checkpoint_every_steps=2",
]


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., Config]:
    """``make_cfg(*overrides, out="run")``: the digits recipe with quiet logging."""

    def make(*overrides: str, out: str = "run") -> Config:
        return resolve_config(overrides=[f"out_dir={tmp_path / out}", *QUIET, *overrides])

    return make


def _run_cli(
    *args: str, timeout: float = 120, python_module: bool = False, faults: str = ""
) -> subprocess.CompletedProcess:
    """``python -m normfree ARGS`` (``python ARGS`` with ``python_module``) in a subprocess;
    ``faults`` (e.g. ``"crash_after=7"``) runs it through ``faulty_normfree.py`` instead."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env["NORMFREE_TEST_FAULTS"] = faults
    cmd = [sys.executable, *args] if python_module else [sys.executable, "-m", "normfree", *args]
    if faults and not python_module:
        cmd = [sys.executable, FAULTY_CLI, *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = torch.load(Path(run_dir) / "last.pt", weights_only=True)
    return {"model": state["model"], "ema": state["ema"]["module"]}


def _assert_same_weights(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


@pytest.fixture
def random_run() -> list[str]:
    return list(RANDOM_RUN)


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    return _run_cli


@pytest.fixture
def final_weights() -> Callable[[Path], dict]:
    return _final_weights


@pytest.fixture
def assert_same_weights() -> Callable[[dict, dict], None]:
    return _assert_same_weights


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> object:
    """Tests that build a Trainer directly set torch's thread count; restore it afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
