"""The grid machinery behind ``normfree experiment``: an :class:`Experiment` declares its cells
(model × setting × seed), how one cell runs, the table columns and the figure;
:func:`run_experiment` runs the cells that have no result yet (in parallel processes with
``jobs > 1``), prints one progress line per cell, then writes the results table (``results.csv``
and ``results.json``) and the figure, every file atomically.

Layout of an experiment folder::

    OUT/cells/<cell key>/result.json   # one per finished cell: its presence means "done"
    OUT/cells/<cell key>/run/          # the training run folder of a training cell
    OUT/results.csv, OUT/results.json  # the table (one row per finished cell)
    OUT/<name>.png                     # the figure

Rerunning the same command resumes: finished cells are skipped, unfinished ones start afresh.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normfree.atomic import atomic_write_json, atomic_write_text

__all__ = [
    "EXPERIMENTS",
    "Cell",
    "Experiment",
    "ExperimentError",
    "GridOptions",
    "cell_dir",
    "default_out",
    "get_experiment",
    "register_experiment",
    "run_experiment",
    "table_rows",
    "write_table",
]

RESULT_FILE = "result.json"
MAX_SEEDS = 1000  # seeds per grid point (a grid holds cells × seeds folders)


class ExperimentError(ValueError):
    """Bad experiment input (unknown name, bad option, unwritable folder); the message says how to
    fix it."""


@dataclass(frozen=True)
class GridOptions:
    """What the command line chose: quick variant, dataset spec (``None``: the experiment's
    default), number of seeds, CPU threads per cell."""

    quick: bool = False
    data: str | None = None
    seeds: int = 1
    threads: int = 1


@dataclass(frozen=True)
class Cell:
    """One point of the grid. ``key`` names its folder (letters, digits, ``-_.=``);
    ``params`` (JSON values) become the first columns of its table row."""

    key: str
    params: dict[str, Any]


@dataclass
class Experiment:
    """A declarative grid.

    Attributes:
        name: the CLI name.
        claim: one line: the paper's claim the experiment tests.
        cells: ``options -> cells`` of the grid.
        run_cell: ``(cell, cell_dir, options) -> result`` (JSON-able dict); runs in a worker
            process when ``jobs > 1``, so it must be a module-level function.
        columns: result keys shown in the table after the cell's params (others stay in JSON).
        plot: ``(rows, path, options) -> None`` draws the figure from the table rows.
        default_data: the dataset spec used when ``--data`` is not given (``None``: no data).
    """

    name: str
    claim: str
    cells: Callable[[GridOptions], list[Cell]]
    run_cell: Callable[[Cell, Path, GridOptions], dict[str, Any]]
    columns: Sequence[str]
    plot: Callable[[list[dict[str, Any]], Path, GridOptions], None]
    default_data: str | None = None


EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(exp: Experiment) -> Experiment:
    """Add ``exp`` to :data:`EXPERIMENTS` (names are unique)."""
    if exp.name in EXPERIMENTS and EXPERIMENTS[exp.name] is not exp:
        raise ValueError(f"experiment {exp.name!r} is already registered")
    EXPERIMENTS[exp.name] = exp
    return exp


def get_experiment(name: str) -> Experiment:
    """The registered experiment ``name``, or :class:`ExperimentError` listing the known ones."""
    from normfree.experiments import catalog  # noqa: F401  (registers the built-in experiments)

    if name not in EXPERIMENTS:
        known = ", ".join(sorted(EXPERIMENTS))
        raise ExperimentError(
            f"unknown experiment {name!r}; known: {known} (normfree experiment --list)"
        )
    return EXPERIMENTS[name]


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.key


def _check_cells(cells: list[Cell]) -> None:
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate cell keys in {keys}")
    for k in keys:
        if not k or not all(ch.isalnum() or ch in "-_.=" for ch in k) or k.startswith("."):
            raise ValueError(f"cell key {k!r} must be letters, digits and -_.= only")


def _exit_with_parent(parent_pid: int) -> None:
    """Initializer of a cell worker: end it when the process that started it dies, even by
    SIGKILL or the OOM killer (which run no cleanup), so that no orphan keeps training into the
    experiment folder that a rerun is about to reuse. Linux: ``PR_SET_PDEATHSIG``; elsewhere
    (or if that fails) a daemon thread waiting on the parent process's sentinel."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL) == 0:  # PR_SET_PDEATHSIG = 1
            if os.getppid() != parent_pid:  # it died before the request took effect
                os._exit(1)
            return
    parent = multiprocessing.parent_process()
    if parent is None:  # not started by multiprocessing: nothing to watch
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def _workers_deaf_to_ctrl_c() -> Iterator[None]:
    """Start the cell workers inside this: they inherit SIGINT blocked (POSIX), for life.
    Ctrl-C reaches the whole process group; a worker would print a traceback (while it
    imports) or take it as its trainer's "finish the step, then stop". This process alone
    handles it (:func:`_stop_pool`); one pressed meanwhile is raised on leaving."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _stop_pool(pool: ProcessPoolExecutor, others: set[Any]) -> None:
    """Cancel the cells not started and kill the running ones (their folders hold no result
    file, so a rerun starts them afresh). A worker left alive would take the next queued cell,
    and ``shutdown`` would wait for the whole grid. SIGKILL, not SIGTERM: a cell's trainer
    traps SIGTERM to finish its step, after which its worker waited for work forever and the
    interpreter's exit, which joins the pool's workers, hung.
    The workers are this process's children that were not there before the pool (``others``):
    a child the caller started meanwhile from another thread would be ended too."""
    processes = [p for p in multiprocessing.active_children() if p not in others]
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.kill()
    for proc in processes:
        proc.join(10)


def _execute(
    run_cell: Callable[..., dict[str, Any]], experiment: str, cell: Cell, folder: str,
    options: GridOptions,
) -> dict[str, Any]:
    """Run one cell (in this or a worker process) and write its result file atomically."""
    import torch

    torch.set_num_threads(max(1, options.threads))
    path = Path(folder)
    t0 = time.perf_counter()
    result = dict(run_cell(cell, path, options))
    result.setdefault("wall_s", round(time.perf_counter() - t0, 2))
    atomic_write_json(path / RESULT_FILE, {"cell": cell.key, "experiment": experiment,
                                           **_settings(cell, options), "result": result})
    return result


def _grid_settings(options: GridOptions) -> dict[str, Any]:
    """What every cell of a grid shares that its result depends on: the quick variant, the
    data and the CPU threads (the order of float sums, so the last digits, depends on them)."""
    return {"quick": options.quick, "data": options.data, "threads": options.threads}


def _settings(cell: Cell, options: GridOptions) -> dict[str, Any]:
    """What a cell's result depends on besides its seed (its key): stored with the result and
    compared on a rerun, so a folder made with other settings is never read as this grid's."""
    return {"params": cell.params, **_grid_settings(options)}


def _check_folder(out: Path, experiment: str, options: GridOptions) -> None:
    """:class:`ExperimentError` when any finished cell in ``out`` (of this grid or not: the
    quick and the full grid share no cell) belongs to another experiment or was made with other
    grid settings: one folder never holds two grids, and a report never reads another's."""
    expected = json.loads(json.dumps(_grid_settings(options)))  # as JSON reads it back
    for path in sorted((out / "cells").glob(f"*/{RESULT_FILE}")):
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # (a damaged file: its cell reruns, or is not this grid's)
        if not isinstance(stored, dict):
            continue
        theirs = stored.get("experiment", experiment)  # (files of earlier versions lack it)
        differ = [k for k, v in expected.items() if k in stored and stored[k] != v]
        if theirs != experiment or differ:
            was = ", ".join(f"{k}={stored[k]!r}" for k in differ) or f"experiment {theirs!r}"
            now = ", ".join(f"{k}={expected[k]!r}" for k in differ) or f"experiment {experiment!r}"
            raise ExperimentError(
                f"{out} was made with other settings (cell {path.parent.name}: {was}; now "
                f"{now}); use another --out, or the options it was made with"
            )


def _load_result(
    folder: Path, cell: Cell, options: GridOptions | None
) -> dict[str, Any] | None:
    """The cell's stored result; None when it has none or an unreadable one (the cell reruns).
    :class:`ExperimentError` when it was made with other params (``options`` None: not
    compared); the settings every cell shares are checked once per folder
    (:func:`_check_folder`, before a run or a report reads anything)."""
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or not isinstance(stored.get("result"), dict):
        return None
    if options is None:
        return stored["result"]
    expected = json.loads(json.dumps({"params": cell.params}))  # as JSON reads it back
    differ = [k for k, v in expected.items() if k in stored and stored[k] != v]
    if differ:
        was = ", ".join(f"{k}={stored[k]!r}" for k in differ)
        raise ExperimentError(
            f"{path.parent.parent.parent} was made with other settings (cell {cell.key}: {was}; "
            f"now {', '.join(f'{k}={expected[k]!r}' for k in differ)}); use another --out, or "
            "the options it was made with"
        )
    return stored["result"]


def _short(result: dict[str, Any], columns: Sequence[str]) -> str:
    parts = []
    for c in columns:
        v = result.get(c)
        if isinstance(v, float):
            parts.append(f"{c}={v:.4g}")
        elif v is not None and not isinstance(v, (list, dict)):
            parts.append(f"{c}={v}")
    return " ".join(parts)


def run_experiment(
    exp: Experiment,
    out: str | Path,
    options: GridOptions | None = None,
    jobs: int = 1,
    log: Callable[[str], None] = print,
    report_only: bool = False,
) -> list[dict[str, Any]]:
    """Run every unfinished cell of ``exp`` into ``out``, then write the table and the figure.

    Returns the table rows (one per finished cell, grid order). Cells that raise are reported
    and left unfinished (a rerun retries them); :class:`ExperimentError` is raised at the end
    naming them, after the table of the others has been written. ``report_only`` runs nothing
    and touches no cell folder (a grid may be running there): it only writes the table and the
    figure of the cells finished so far.
    """
    options = options or GridOptions()
    if jobs < 1:
        raise ExperimentError(f"--jobs must be >= 1, got {jobs}")
    if not 1 <= options.seeds <= MAX_SEEDS:
        raise ExperimentError(f"--seeds must be from 1 to {MAX_SEEDS}, got {options.seeds}")
    out = Path(out)
    if (out / "cells").is_dir():
        _check_folder(out, exp.name, options)
    try:
        (out / "cells").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExperimentError(f"cannot create the experiment folder {out}: {e.strerror}") from None
    cells = exp.cells(options)
    _check_cells(cells)
    n = len(cells)
    pending: list[tuple[int, Cell]] = []
    for i, cell in enumerate(cells, 1):
        if _load_result(cell_dir(out, cell), cell, options) is not None:
            log(f"[{i}/{n}] {cell.key}: done before, skipped")
        elif report_only:
            log(f"[{i}/{n}] {cell.key}: not finished, left out")
        else:
            pending.append((i, cell))
    failed: list[str] = []
    t0 = time.perf_counter()

    def report(i: int, cell: Cell, fut_result: Callable[[], dict[str, Any]]) -> None:
        try:
            result = fut_result()
        except Exception as e:  # one broken cell must not stop the grid
            failed.append(cell.key)
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            log(f"[{i}/{n}] {cell.key}: FAILED: {last}")
            return
        log(f"[{i}/{n}] {cell.key}: {_short(result, exp.columns)} "
            f"({result.get('wall_s', 0):.1f}s, total {time.perf_counter() - t0:.0f}s)")  # fmt: skip

    for _, cell in pending:  # a half-written cell from an interrupted run starts afresh
        folder = cell_dir(out, cell)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    if jobs == 1 or len(pending) <= 1:
        for i, cell in pending:
            log(f"[{i}/{n}] {cell.key}: running")
            folder = str(cell_dir(out, cell))
            report(i, cell,
                   lambda c=cell, f=folder: _execute(exp.run_cell, exp.name, c, f, options))
    else:
        ctx = multiprocessing.get_context("spawn")
        others = set(multiprocessing.active_children())  # the caller's own, left alone
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_exit_with_parent,
                                   initargs=(os.getpid(),))  # fmt: skip
        try:
            futures: dict[Future[dict[str, Any]], tuple[int, Cell]] = {}
            with _workers_deaf_to_ctrl_c():  # submit starts the workers
                for i, cell in pending:
                    fut = pool.submit(_execute, exp.run_cell, exp.name, cell,
                                      str(cell_dir(out, cell)), options)  # fmt: skip
                    futures[fut] = (i, cell)
            log(f"running {len(pending)} cells in {jobs} processes")
            running = set(futures)
            while running:  # a line per cell as soon as it finishes; short waits, so that a
                # Ctrl-C (raised in this, the main thread) is not held up by a long wait
                done, running = wait(running, timeout=0.25, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: futures[f][0]):
                    i, cell = futures[fut]
                    report(i, cell, fut.result)
        except BaseException:  # Ctrl-C: stop now, not after every queued cell has run
            _stop_pool(pool, others)
            raise
        pool.shutdown()
    rows = table_rows(exp, out, cells, options)
    if report_only and not rows:  # (the tables of a finished grid are not emptied)
        raise ExperimentError(
            f"--report: no finished cell of this grid in {out}; nothing was written (was it "
            "made with --quick, or with other --seeds?)"
        )
    write_table(exp, out, rows)
    if rows:
        try:
            exp.plot(rows, out / f"{exp.name}.png", options)
        except ImportError as e:
            log(f"no figure: {e}")
        except (KeyError, TypeError, ValueError) as e:  # a hand-edited or damaged result.json
            raise ExperimentError(
                f"cannot draw {exp.name}.png from the results in {out} ({type(e).__name__}: "
                f"{e}); a cell's result.json is damaged: delete that cell folder to rerun it"
            ) from None
    figure = f", figure {out / f'{exp.name}.png'}" if rows else ", no figure (no results)"
    log(f"{len(rows)}/{n} cells done; table {out / 'results.csv'}{figure}")
    if failed:
        raise ExperimentError(f"{len(failed)} cell(s) failed: {', '.join(failed)}; "
                              "rerun the same command to retry them")  # fmt: skip
    return rows


def table_rows(
    exp: Experiment, out: Path, cells: list[Cell], options: GridOptions | None = None
) -> list[dict[str, Any]]:
    """One row per finished cell, in grid order: its params then its result (with ``options``,
    a cell made with other params is refused; :func:`run_experiment` checks the rest of the
    folder's settings first)."""
    rows = []
    for cell in cells:
        result = _load_result(cell_dir(out, cell), cell, options)
        if result is not None:
            rows.append({"cell": cell.key, **cell.params, **result})
    return rows


def _csv_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def write_table(exp: Experiment, out: Path, rows: list[dict[str, Any]]) -> None:
    """``results.csv`` (cell, params, ``exp.columns``) and ``results.json`` (full rows), both
    atomically."""
    params: list[str] = []
    for r in rows:
        for k in r:
            if (
                k not in params
                and k != "cell"
                and k not in exp.columns
                and not isinstance(r[k], (list, dict))
                and k != "wall_s"
            ):
                params.append(k)
    header = ["cell", *params, *exp.columns, "wall_s"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        writer.writerow([_csv_value(r.get(k)) for k in header])
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_json(out / "results.json", {"experiment": exp.name, "claim": exp.claim,
                                             "columns": header, "rows": rows})  # fmt: skip


def default_out(name: str, quick: bool) -> Path:
    """``experiments/<name>[-quick]`` under the current folder."""
    return Path("experiments") / (name + ("-quick" if quick else ""))
