"""``normfree.train.allocator.tune_malloc``: glibc keeps freed memory, so a repeated
allocate-touch-free pattern (a training step's) stops taking page faults; the user's own
allocator choice is left alone; the training loop applies it on CPU unless told not to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from types import SimpleNamespace

import pytest

import normfree.train.allocator as allocator
from normfree.train import Config, Trainer
from normfree.train.distributed import DistInfo

# a step-like pattern in a fresh process: four 28 MiB blocks (below glibc's 32 MiB mmap
# ceiling, above its default trim threshold once they are freed together) allocated, written
# and freed six times; minor page faults (getrusage) per repetition as JSON
_PROBE = r"""
import ctypes, json, resource, sys
import torch
if sys.argv[1] == "tuned":
    from normfree.train.allocator import tune_malloc
    print(tune_malloc())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
SIZE = 28 << 20

def c_step():
    blocks = [libc.malloc(SIZE) for _ in range(4)]
    for b in blocks:
        libc.memset(b, 1, SIZE)
    for b in blocks:
        libc.free(b)

def torch_step():
    tensors = [torch.ones(7_000_000) for _ in range(4)]  # 28 MB each
    del tensors

faults = {}
for name, step in (("c", c_step), ("torch", torch_step)):
    faults[name] = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
_PAGES = 4 * (28 << 20) // 4096  # pages one repetition touches: 28 672


def _probe(mode: str) -> tuple[str, dict[str, list[int]]]:
    env_clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env_clean.pop("GLIBC_TUNABLES", None)
    env_clean.pop("LD_PRELOAD", None)
    env_clean["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True, text=True, timeout=120, env=env_clean, check=True,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    return (lines[0] if len(lines) > 1 else ""), json.loads(lines[-1])


glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="needs Linux with glibc")


@glibc_only
def test_tuned_heap_serves_repeated_steps_without_page_faults() -> None:
    """Control: under glibc's defaults the four freed blocks trim the heap, so every
    repetition faults all its pages in again (28 672 pages, ±1 %). Tuned: after the first
    repetition (which maps the heap once) no C repetition takes more than 64 faults (the
    interpreter's own small allocations). Torch's tensors then reuse that heap: the Python
    objects allocated between them can shift a block past the old top once (≤ 5 508 pages
    seen), so the bound there is a quarter of one repetition's pages over five repetitions."""
    _, default = _probe("default")
    assert all(abs(f - _PAGES) <= 0.01 * _PAGES for f in default["c"]), default
    message, tuned = _probe("tuned")
    assert message == "malloc: tuned (heap kept, blocks up to 32 MiB from the heap)"
    assert tuned["c"][0] >= 0.99 * _PAGES  # the first use still maps its pages
    assert max(tuned["c"][1:]) <= 64, tuned
    assert sum(tuned["torch"][1:]) <= _PAGES // 4, tuned


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """``tune_malloc`` in a state where it has not run, with ``mallopt`` recorded instead of
    called (this pytest process keeps its allocator) and no allocator variables set."""
    monkeypatch.setattr(allocator, "_applied", False)
    for name in (*allocator._USER_VARIABLES, "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 1

    monkeypatch.setattr(allocator, "_glibc", lambda: SimpleNamespace(mallopt=mallopt))
    return calls


def test_sets_mmap_threshold_and_disables_trimming_once(fresh: list[tuple[int, int]]) -> None:
    assert allocator.tune_malloc().startswith("malloc: tuned")
    assert fresh == [(-3, 32 << 20), (-1, -1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)
    assert allocator.tune_malloc().startswith("malloc: already tuned")
    assert len(fresh) == 2


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("MALLOC_TRIM_THRESHOLD_", "1000000", "MALLOC_TRIM_THRESHOLD_ is set"),
        ("MALLOC_ARENA_MAX", "2", "MALLOC_ARENA_MAX is set"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0", "GLIBC_TUNABLES sets malloc"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc is preloaded"),
    ],
)
def test_leaves_a_configured_allocator_alone(
    fresh: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch, name: str, value: str,
    reason: str,
) -> None:  # fmt: skip
    monkeypatch.setenv(name, value)
    message = allocator.tune_malloc()
    assert message.startswith("malloc: left as configured (") and reason in message
    assert fresh == []


def test_other_settings_in_the_environment_do_not_count(
    fresh: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libfaketime.so")
    assert allocator.tune_malloc().startswith("malloc: tuned")
    assert len(fresh) == 2


def test_not_glibc_is_left_as_is(
    fresh: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.tune_malloc() == "malloc: left as is (not glibc)"
    assert fresh == []


def test_trainer_tunes_on_cpu_unless_configured_off(
    make_cfg: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Called once per trainer on CPU, its line in the run summary; not called (summary None)
    with ``train.tune_malloc=false``."""
    calls: list[int] = []
    monkeypatch.setattr(
        "normfree.train.loop.tune_malloc", lambda: calls.append(1) or "malloc: tuned (test)"
    )
    trainer = Trainer(make_cfg(out="on"), DistInfo())
    trainer.close()
    assert calls == [1] and trainer.summary("running")["malloc"] == "malloc: tuned (test)"
    trainer = Trainer(make_cfg("train.tune_malloc=false", out="off"), DistInfo())
    trainer.close()
    assert calls == [1] and trainer.summary("running")["malloc"] is None
