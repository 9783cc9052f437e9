"""The ``--quick`` variants of the experiments, each asserting the direction of its paper's claim
with a margin that fails if the technique breaks. Numbers of the full runs: docs/experiments.md.
Only proxy-norm (a few seconds, no training) runs by default; the training ones are ``slow``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from normfree.experiments import GridOptions, get_experiment, run_experiment
from normfree.experiments.proxy_norm import NORMS


def _rows(name: str, out: Path, jobs: int = 1) -> dict[str, dict[str, Any]]:
    rows = run_experiment(get_experiment(name), out, GridOptions(quick=True), jobs=jobs,
                          log=lambda s: None)  # fmt: skip
    assert (out / f"{name}.png").stat().st_size > 1000
    return {r["cell"]: r for r in rows}


def test_proxy_norm_quick_pn_removes_channel_collapse(tmp_path: Path) -> None:
    rows = _rows("proxy-norm", tmp_path)
    for arch in ("ff", "res"):
        share = {n: rows[f"{arch}-{n}-s0"]["deep_share"] for n in NORMS}
        # measured (quick, seed 0): ff LN 0.76, GN 0.38, LN+PN 0.041, GN+PN 0.038, BN 0.037;
        # res LN 0.81, GN 0.53, LN+PN 0.046, GN+PN 0.043, BN 0.041
        assert share["ln"] > 0.5  # LN collapses towards channel-wise constants
        assert share["gn"] > 0.25
        assert share["lnpn"] < share["ln"] / 8  # ... and PN removes the collapse
        assert share["gnpn"] < share["gn"] / 4
        assert max(share["lnpn"], share["gnpn"]) < 2 * share["bn"]  # at BN's level
        assert share["bn"] < 0.1
        # the first pre-activation is the same for all (no depth yet)
        assert rows[f"{arch}-ln-s0"]["first_share"] < 0.1


@pytest.mark.slow
def test_proxy_norm_quick_in_parallel_equals_serial(tmp_path: Path) -> None:
    serial = _rows("proxy-norm", tmp_path / "serial")
    parallel = _rows("proxy-norm", tmp_path / "parallel", jobs=2)
    for key, row in serial.items():
        assert parallel[key]["curve"] == row["curve"]
    table = json.loads((tmp_path / "parallel" / "results.json").read_text())
    assert [r["cell"] for r in table["rows"]] == list(serial)


@pytest.mark.slow
def test_agc_quick_agc_trains_where_no_clipping_diverges(tmp_path: Path) -> None:
    rows = _rows("agc", tmp_path)
    none, agc = rows["none-lr3.2-s0"], rows["agc0.01-lr3.2-s0"]
    # measured (lr 3.2, batch 256, 20 steps): no clipping non-finite at step 9; AGC 36.8 %
    assert none["diverged"] and none["val_top1"] is None
    assert none["diverged_step"] <= 15
    assert not agc["diverged"]
    assert agc["val_top1"] > 20.0  # chance is 10 %: AGC learns at this lr
    assert all(loss is not None for _, loss in agc["curve"])


@pytest.mark.slow
def test_depth_quick_he_init_overflows_at_1202_layers_skipinit_does_not(tmp_path: Path) -> None:
    rows = _rows("depth", tmp_path)
    # measured: SkipInit-1202 val loss 2.42 after 4 steps, He-init-1202 non-finite at step 1
    he, skip = rows["he-d1202-s0"], rows["skipinit-d1202-s0"]
    assert he["diverged"] and he["diverged_step"] == 1
    assert not skip["diverged"] and skip["val_loss"] < 3.0
    assert not rows["he-d20-s0"]["diverged"]  # at depth 20 the same init is finite


@pytest.mark.slow
def test_msr_quick_trains_without_minibatch_statistics(tmp_path: Path) -> None:
    rows = _rows("msr", tmp_path)
    # measured (2 epochs, batch 64): MSR 53.5 %, BN 75.5 %, NF 37.9 % (chance 10 %)
    msr = rows["msr-lr0.4-s0"]
    assert not msr["diverged"] and msr["val_top1"] > 40.0
    assert msr["val_top1"] > rows["nf-lr0.4-s0"]["val_top1"] + 5.0
    assert msr["steps"] == rows["bn-lr0.4-s0"]["steps"] == 44  # the same budget


@pytest.mark.slow
def test_small_batch_quick_nf_keeps_its_accuracy_at_batch_2(tmp_path: Path) -> None:
    rows = _rows("small-batch", tmp_path)
    # measured (1 epoch, lr ∝ batch): NF 33.1 % at batch 2, 32.9 % at 64; BN 55.7 % / 30.4 %
    # (BN does not degrade at this scale: docs/experiments.md)
    nf2, nf64 = rows["nf-b2-s0"]["val_top1"], rows["nf-b64-s0"]["val_top1"]
    assert nf2 > 25.0 and nf64 > 25.0  # both learn (chance 10 %)
    assert nf2 > nf64 - 5.0  # batch 2 costs NF no accuracy at the same epochs
    assert (rows["nf-b2-s0"]["steps"], rows["nf-b64-s0"]["steps"]) == (719, 22)  # one epoch each
