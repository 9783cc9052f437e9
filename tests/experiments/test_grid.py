"""The grid machinery of ``normfree experiment`` on a tiny fake grid (no training): resume skips
finished cells, a half-written cell restarts, failures are reported and retried, tables are
written atomically with the right rows, the CLI rejects bad input with one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from normfree.cli import main
from normfree.experiments import Cell, Experiment, ExperimentError, GridOptions, run_experiment

CALLS: list[str] = []


def _cells(options: GridOptions) -> list[Cell]:
    return [Cell(f"m{m}-x{x}-s{s}", {"model": m, "x": x, "seed": s})
            for m in ("a", "b") for x in (1, 2, 4) for s in range(options.seeds)]  # fmt: skip


def _run(cell: Cell, folder: Path, options: GridOptions) -> dict[str, Any]:
    CALLS.append(cell.key)
    (folder / "scratch.txt").write_text("partial work")
    p = cell.params
    if p["model"] == "b" and p["x"] == 4 and (folder.parent.parent / "fail").exists():
        raise RuntimeError("boom")
    y = 10.0 * p["x"] + (0.5 if p["model"] == "b" else 0.0) + p["seed"]
    return {"y": y, "diverged": p["x"] == 4 and p["model"] == "a", "curve": [[1, y]]}


def _plot(rows: list[dict[str, Any]], path: Path, options: GridOptions) -> None:
    path.write_text(f"{len(rows)} rows")  # a stand-in figure: the call and its rows


FAKE = Experiment("fake", "a fake claim", _cells, _run, ["y", "diverged"], _plot)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_grid_runs_every_cell_and_writes_table_and_figure(tmp_path: Path) -> None:
    CALLS.clear()
    lines: list[str] = []
    rows = run_experiment(FAKE, tmp_path, GridOptions(seeds=2), log=lines.append)
    assert len(CALLS) == 12 and len(rows) == 12
    table = _read_csv(tmp_path / "results.csv")
    assert list(table[0]) == ["cell", "model", "x", "seed", "y", "diverged", "wall_s"]
    assert [r["cell"] for r in table] == [c.key for c in _cells(GridOptions(seeds=2))]
    row = next(r for r in table if r["cell"] == "mb-x2-s1")
    assert float(row["y"]) == 21.5 and row["diverged"] == "False"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["experiment"] == "fake" and data["rows"][0]["curve"] == [[1, 10.0]]
    assert (tmp_path / "fake.png").read_text() == "12 rows"
    assert sum("running" in line for line in lines) == 12
    assert lines[-1].startswith("12/12 cells done")


def test_resume_skips_finished_cells_and_restarts_half_written_ones(tmp_path: Path) -> None:
    CALLS.clear()
    run_experiment(FAKE, tmp_path, GridOptions(), log=lambda s: None)
    assert len(CALLS) == 6
    CALLS.clear()
    lines: list[str] = []
    run_experiment(FAKE, tmp_path, GridOptions(), log=lines.append)
    assert CALLS == []  # every cell had its result file
    assert sum("done before, skipped" in line for line in lines) == 6
    # a cell interrupted mid-run: folder and scratch file, no result file
    (tmp_path / "cells" / "ma-x2-s0" / "result.json").unlink()
    (tmp_path / "cells" / "ma-x2-s0" / "stale.txt").write_text("left over")
    CALLS.clear()
    run_experiment(FAKE, tmp_path, GridOptions(), log=lambda s: None)
    assert CALLS == ["ma-x2-s0"]
    assert not (tmp_path / "cells" / "ma-x2-s0" / "stale.txt").exists()  # started afresh
    # more seeds later: only the new cells run
    CALLS.clear()
    rows = run_experiment(FAKE, tmp_path, GridOptions(seeds=2), log=lambda s: None)
    assert sorted(CALLS) == sorted(f"m{m}-x{x}-s1" for m in "ab" for x in (1, 2, 4))
    assert len(rows) == 12


def test_a_folder_made_with_other_settings_is_refused(tmp_path: Path) -> None:
    """Cell keys do not say quick/full or the dataset: a rerun with other settings would read
    the old results as its own. It is refused, nothing runs and the table stays."""
    run_experiment(FAKE, tmp_path, GridOptions(quick=True), log=lambda s: None)
    table = (tmp_path / "results.csv").read_text()
    for other, was in ((GridOptions(), "quick=True"), (GridOptions(quick=True, data="digits"),
                                                       "data=None")):  # fmt: skip
        CALLS.clear()
        with pytest.raises(ExperimentError, match=f"made with other settings .*{was}"):
            run_experiment(FAKE, tmp_path, other, log=lambda s: None)
        with pytest.raises(ExperimentError, match="use another --out"):
            run_experiment(FAKE, tmp_path, other, log=lambda s: None, report_only=True)
        assert CALLS == []
    assert (tmp_path / "results.csv").read_text() == table
    run_experiment(FAKE, tmp_path, GridOptions(quick=True), log=lambda s: None)  # the same: fine
    from normfree.experiments.grid import table_rows

    assert len(table_rows(FAKE, tmp_path, _cells(GridOptions()))) == 6  # no options: no check


def test_a_damaged_result_file_reruns_its_cell_or_is_one_error(tmp_path: Path) -> None:
    run_experiment(FAKE, tmp_path, GridOptions(), log=lambda s: None)
    result = tmp_path / "cells" / "ma-x1-s0" / "result.json"
    for damaged in ("[]", "null", '{"result": 5}', "garbage{"):
        result.write_text(damaged)
        CALLS.clear()
        run_experiment(FAKE, tmp_path, GridOptions(), log=lambda s: None)
        assert CALLS == ["ma-x1-s0"], damaged
    curves = Experiment("fake", "", _cells, _run, ["y"],
                        lambda rows, path, o: [r["curve"] for r in rows])  # fmt: skip
    stored = json.loads(result.read_text())
    del stored["result"]["curve"]  # valid JSON, the right shape, a field the figure needs gone
    result.write_text(json.dumps(stored))
    with pytest.raises(ExperimentError, match=r"cannot draw fake\.png .*'curve'.*delete that"):
        run_experiment(curves, tmp_path, GridOptions(), log=lambda s: None)


def test_report_only_tabulates_finished_cells_and_touches_nothing(tmp_path: Path) -> None:
    run_experiment(FAKE, tmp_path, GridOptions(), log=lambda s: None)
    (tmp_path / "cells" / "mb-x1-s0" / "result.json").unlink()  # as if still running
    CALLS.clear()
    lines: list[str] = []
    rows = run_experiment(FAKE, tmp_path, GridOptions(), log=lines.append, report_only=True)
    assert CALLS == [] and len(rows) == 5
    assert "[4/6] mb-x1-s0: not finished, left out" in lines
    assert (tmp_path / "cells" / "mb-x1-s0" / "scratch.txt").exists()  # a running cell's files
    assert len(_read_csv(tmp_path / "results.csv")) == 5
    assert (tmp_path / "fake.png").read_text() == "5 rows"


def test_failed_cell_is_reported_kept_out_of_the_table_and_retried(tmp_path: Path) -> None:
    (tmp_path / "fail").write_text("")
    lines: list[str] = []
    with pytest.raises(ExperimentError, match=r"1 cell\(s\) failed: mb-x4-s0"):
        run_experiment(FAKE, tmp_path, GridOptions(), log=lines.append)
    assert any("mb-x4-s0: FAILED: RuntimeError: boom" in line for line in lines)
    assert len(_read_csv(tmp_path / "results.csv")) == 5  # the others are tabulated
    (tmp_path / "fail").unlink()
    CALLS.clear()
    run_experiment(FAKE, tmp_path, GridOptions(), log=lambda s: None)
    assert CALLS == ["mb-x4-s0"]
    assert len(_read_csv(tmp_path / "results.csv")) == 6


def test_bad_grid_options_and_keys_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="--jobs must be >= 1"):
        run_experiment(FAKE, tmp_path, jobs=0)
    for seeds in (0, 1001):  # (a huge count filled the memory with cells before any ran)
        with pytest.raises(ExperimentError, match="--seeds must be from 1 to 1000"):
            run_experiment(FAKE, tmp_path / "s", GridOptions(seeds=seeds))
    assert not (tmp_path / "s").exists()
    bad = Experiment("bad", "", lambda o: [Cell("../up", {})], _run, ["y"], _plot)
    with pytest.raises(ValueError, match="letters, digits"):
        run_experiment(bad, tmp_path / "b", log=lambda s: None)
    dup = Experiment("dup", "", lambda o: [Cell("a", {}), Cell("a", {})], _run, ["y"], _plot)
    with pytest.raises(ValueError, match="duplicate"):
        run_experiment(dup, tmp_path / "d", log=lambda s: None)


def test_cli_lists_and_rejects_bad_input_with_one_line(tmp_path: Path, capsys) -> None:
    assert main(["experiment", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["small-batch", "agc", "depth", "proxy-norm", "msr"]
    cases = [
        (["experiment", "nope"], "unknown experiment 'nope'"),
        (["experiment"], "name an experiment"),
        (["experiment", "agc", "--seeds", "0"], "--seeds must be >= 1"),
        (["experiment", "agc", "--jobs", "0"], "--jobs must be >= 1"),
        (["experiment", "agc", "--data", "cifar10:/does/not/exist", "--out", str(tmp_path / "o")],
         "--data 'cifar10:/does/not/exist'"),
        (["experiment", "agc", "--data", "nonsense"], "unknown dataset spec"),
        (["experiment", "agc", "--report", "--out", str(tmp_path / "none")],
         "--report: no experiment folder"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()  # nothing was written for a bad --data
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["experiment", "proxy-norm", "--quick", "--out", str(blocker / "x")]) == 2
    assert "cannot create the experiment folder" in capsys.readouterr().err


PARENT = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from normfree.experiments.grid import _exit_with_parent

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=_exit_with_parent,
                               initargs=(os.getpid(),))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 120)
    time.sleep(120)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "kill"), reason="POSIX signals")
def test_cell_workers_end_when_the_grid_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL (or the OOM killer) of ``normfree experiment --jobs N`` runs no cleanup; its
    workers must not live on, training into the folder a rerun reuses."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        stat = Path(f"/proc/{worker}/stat")
        if stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z":
            return  # dead, waiting for a reaper that may not exist in a container
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived its killed parent")


def test_cli_unwritable_outputs_and_an_empty_out_are_one_line(tmp_path: Path, capsys) -> None:
    from normfree.experiments.grid import RESULT_FILE, cell_dir, get_experiment

    out = tmp_path / "pn"
    cell = get_experiment("proxy-norm").cells(GridOptions(quick=True))[0]
    cell_dir(out, cell).mkdir(parents=True)  # one finished cell, so that --report writes
    (cell_dir(out, cell) / RESULT_FILE).write_text(json.dumps(
        {"cell": cell.key, "params": cell.params, "quick": True, "result": {"deep_share": 0.1}}
    ))  # fmt: skip
    (out / "results.csv").mkdir()  # the table cannot be written
    assert main(["experiment", "proxy-norm", "--quick", "--report", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "results.csv" in err and len(err.splitlines()) == 1
    assert main(["experiment", "proxy-norm", "--quick", "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err


def test_cli_refuses_more_threads_than_cores(tmp_path: Path, capsys) -> None:
    """``--threads 100000`` crashed the OpenMP runtime (segmentation fault) in the first cell."""
    import os

    too_many = (os.cpu_count() or 1) + 1
    out = tmp_path / "o"
    assert main(["experiment", "proxy-norm", "--quick", "--threads", str(too_many),
                 "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert f"--threads must be at most the {too_many - 1} CPU cores" in err
    assert err.count("\n") == 1 and not out.exists()


def test_cli_refuses_data_with_an_empty_split(tmp_path: Path, capsys) -> None:
    """Two images a class leave the held-out split empty: every cell used to start and fail."""
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "tree" / c / f"{i}.png")
    out, spec = tmp_path / "o", f"imagefolder:{tmp_path / 'tree'}"
    assert main(["experiment", "proxy-norm", "--quick", "--data", spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "its held-out split holds no images" in err and err.count("\n") == 1
    assert not out.exists()


def test_no_figure_is_named_when_no_cell_finished(tmp_path: Path) -> None:
    (tmp_path / "fail").write_text("")
    only_failing = Experiment("f", "", lambda o: [Cell("mb-x4-s0", {"model": "b", "x": 4,
                              "seed": 0})], _run, ["y"], _plot)  # fmt: skip
    lines: list[str] = []
    with pytest.raises(ExperimentError, match="1 cell"):
        run_experiment(only_failing, tmp_path, GridOptions(), log=lines.append)
    assert lines[-1].endswith("no figure (no results)") and not (tmp_path / "f.png").exists()


SLOW_GRID = """
import sys, time
from pathlib import Path
from normfree.experiments import Cell, Experiment, GridOptions, run_experiment


def run_cell(cell, folder, options):
    print("started", cell.key, flush=True)
    time.sleep(60)
    return {"y": 1.0}


EXP = Experiment("slow", "", lambda o: [Cell(f"c{i}", {"i": i}) for i in range(6)], run_cell,
                 ["y"], lambda rows, path, options: None)

if __name__ == "__main__":
    import multiprocessing

    other = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(120,),
                                                         daemon=True)
    other.start()  # the caller's own child: Ctrl-C of the grid must leave it alone
    try:
        run_experiment(EXP, Path(sys.argv[1]), GridOptions(), jobs=2, log=lambda s: None)
    except KeyboardInterrupt:
        print("other alive", other.is_alive(), flush=True)
        other.terminate()
        raise
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "killpg"), reason="POSIX signals")
def test_ctrl_c_stops_a_parallel_grid_at_once(tmp_path: Path) -> None:
    """Ctrl-C of ``--jobs 2`` stopped the two running cells, then the workers took the queued
    cells and the grid process waited for all of them (6 cells of 60 s: 3 minutes)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "slowgrid.py").write_text(SLOW_GRID)
    proc = subprocess.Popen([sys.executable, "slowgrid.py", "out"], cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    started = {proc.stdout.readline().split()[-1] for _ in range(2)}  # both workers busy
    assert len(started) == 2
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)  # the grid process only: its workers must end too
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the grid kept running queued cells after Ctrl-C")
    assert proc.returncode != 0 and time.monotonic() - t0 < 30
    assert proc.stdout.read().strip() == "other alive True"  # no queued cell started
    assert not list((tmp_path / "out" / "cells").glob("*/result.json"))


TRAPPING_GRID = """
import os, signal, sys, time
from pathlib import Path
from normfree.experiments import Cell, Experiment, GridOptions, run_experiment


def run_cell(cell, folder, options):  # as the trainer: SIGINT and SIGTERM finish the step
    signal.signal(signal.SIGINT, lambda *a: print("worker got SIGINT", flush=True))
    signal.signal(signal.SIGTERM, lambda *a: None)
    print("started", os.getpid(), flush=True)
    time.sleep(60)
    return {"y": 1.0}


EXP = Experiment("trap", "", lambda o: [Cell(f"c{i}", {"i": i}) for i in range(4)], run_cell,
                 ["y"], lambda rows, path, options: None)

if __name__ == "__main__":
    try:
        run_experiment(EXP, Path(sys.argv[1]), GridOptions(), jobs=2, log=lambda s: None)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "killpg"), reason="POSIX signals")
def test_ctrl_c_of_the_process_group_ends_cells_that_trap_sigterm(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the grid process and its workers. A cell's trainer traps
    SIGINT and SIGTERM (finish the step, then stop): the workers then outlived the grid's
    SIGTERM and its exit, which joins them, hung for good."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "trapgrid.py").write_text(TRAPPING_GRID)
    proc = subprocess.Popen([sys.executable, "trapgrid.py", "out"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    workers = [int(proc.stdout.readline().split()[-1]) for _ in range(2)]  # both cells running
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole process group
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the grid process hung after Ctrl-C")
    assert proc.returncode == 130 and time.monotonic() - t0 < 15
    assert err.strip() == "interrupted"  # one line: no worker's traceback
    assert "worker got SIGINT" not in out  # the grid process alone handles Ctrl-C
    for pid in workers:  # killed and reaped by the grid process
        assert not Path(f"/proc/{pid}").exists() or (
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
        )
    assert not list((tmp_path / "out" / "cells").glob("*/result.json"))


def test_one_folder_never_holds_two_grids(tmp_path: Path) -> None:
    """The quick and the full grid share no cell, and another experiment none either: the check
    of the cells being run let both into one folder, and ``--report`` without ``--quick`` on a
    quick folder emptied its table. Every finished cell is checked now, threads included (they
    change the last digits of a result)."""
    run_experiment(FAKE, tmp_path, GridOptions(quick=True), log=lambda s: None)
    table = (tmp_path / "results.csv").read_text()
    full = Experiment("fake", "", lambda o: [Cell(f"full-{c.key}", c.params) for c in _cells(o)],
                      _run, ["y", "diverged"], _plot)  # fmt: skip
    other = Experiment("other", "", _cells, _run, ["y"], _plot)
    for exp, options, was in ((full, GridOptions(), "quick=True"),
                              (other, GridOptions(quick=True), "experiment 'fake'"),
                              (FAKE, GridOptions(quick=True, threads=2), "threads=1")):  # fmt: skip
        CALLS.clear()
        for report_only in (False, True):
            with pytest.raises(ExperimentError, match=f"made with other settings .*{was}"):
                run_experiment(exp, tmp_path, options, log=lambda s: None, report_only=report_only)
        assert CALLS == []
    assert (tmp_path / "results.csv").read_text() == table
    empty = tmp_path / "empty"
    (empty / "cells").mkdir(parents=True)
    with pytest.raises(ExperimentError, match="--report: no finished cell of this grid"):
        run_experiment(FAKE, empty, GridOptions(), log=lambda s: None, report_only=True)
    assert not (empty / "results.csv").exists()
