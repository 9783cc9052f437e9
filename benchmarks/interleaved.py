"""Side-by-side timing shared by the benchmarks: every variant runs once per round, in a fresh
random order each round, so machine noise hits all of them alike; ratios are taken per round.
Also the name of the machine's CPU for the benchmarks' header lines."""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable

__all__ = ["cpu_name", "median_ratio", "time_interleaved"]


def _time(fn: Callable[[], object], inner: int, clock: Callable[[], float]) -> float:
    fn()  # untimed: absorbs the allocator/cache state left by the previous variant
    start = clock()
    for _ in range(inner):
        fn()
    return (clock() - start) / inner


def time_interleaved(
    steps: dict[str, Callable[[], object]],
    rounds: int,
    inner: int,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each step, one entry per round (after one warm-up call each).

    ``clock`` is wall time by default; ``time.process_time`` (the process's CPU time) is far
    less sensitive to other jobs on a shared machine when the work runs on one thread."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {key: [] for key in steps}
    order = list(steps)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)  # no variant always follows the same one
        for key in order:
            times[key].append(_time(steps[key], inner, clock))
    return times


def median_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of ``times / base`` (both from one :func:`time_interleaved` run)."""
    return statistics.median(t / b for t, b in zip(times, base))


def cpu_name() -> str:
    """The CPU's model name (Linux: ``/proc/cpuinfo``) with the number of logical CPUs this
    process may run on, else the platform's processor or machine string: runs on different
    hosts of one cloud type differ by tens of percent, so every benchmark header names the
    CPU."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({usable} CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()
