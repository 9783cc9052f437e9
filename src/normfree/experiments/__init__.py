"""Reproductions of the papers' training claims as small, resumable grids over the trainer
(``normfree experiment``; docs/experiments.md).

* :class:`Experiment`, :class:`Cell`, :class:`GridOptions` and :func:`run_experiment` — the grid
  machinery (resume, progress, CSV/JSON table, figure, parallel cells);
* :func:`get_experiment` / :data:`EXPERIMENTS` — ``small-batch``, ``agc``, ``depth``,
  ``proxy-norm`` and ``msr`` (registered on first use).
"""

from normfree.experiments.grid import (
    EXPERIMENTS,
    Cell,
    Experiment,
    ExperimentError,
    GridOptions,
    get_experiment,
    register_experiment,
    run_experiment,
)

__all__ = [
    "EXPERIMENTS",
    "Cell",
    "Experiment",
    "ExperimentError",
    "GridOptions",
    "get_experiment",
    "register_experiment",
    "run_experiment",
]
