"""``normfree.train.allocator.tune_malloc``: glibc keeps freed memory, so a repeated
allocate-touch-free pattern (a training step's) stops taking page faults; the user's own
allocator choice is left alone; the training loop applies it on CPU unless told not to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from run_options import QUIET

import normfree.train.allocator as allocator
from normfree.train import Config, Trainer, train
from normfree.train.distributed import DistInfo

# C blocks allocated, written and freed through libc (both probes)
_C_STEP = r"""
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def c_step(size=28 << 20, count=4):
    blocks = [libc.malloc(size) for _ in range(count)]
    for b in blocks:
        libc.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
"""

# step-like patterns in a fresh process (transparent huge pages off, so that a host with THP
# "always" counts pages as this one does), each allocated, written and freed six times: four
# 28 MiB blocks (below glibc's default 32 MiB mmap ceiling, above its default trim threshold
# once they are freed together), the same as torch tensors, and first two 48 MiB blocks
# (mapped afresh by default glibc); minor page faults (getrusage) per repetition as JSON
_PROBE = (
    r"""
import ctypes, json, resource, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, one fault each
import torch
if sys.argv[1] == "tuned":
    from normfree.train.allocator import tune_malloc
    print(tune_malloc())
"""
    + _C_STEP
    + r"""
libc.malloc_trim(0)  # the heap's top as small as it gets, whatever the imports left there

def torch_step():
    tensors = [torch.ones(7_000_000) for _ in range(4)]  # 28 MB each
    del tensors

faults = {}
for name, step in (("big", lambda: c_step(48 << 20, 2)), ("c", c_step),
                   ("torch", torch_step)):  # big first: the heap's top is small then
    faults[name] = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
)
_PAGES = 4 * (28 << 20) // 4096  # pages one repetition touches: 28 672
TUNED = "malloc: tuned (heap kept, blocks up to 1024 MiB from the heap)"


def _expected_tuned() -> str:
    """What tune_malloc reports on this glibc: 1 GiB from 2.35 on, whose mmap threshold has
    no cap; 32 MiB before."""
    version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    major, minor = (int(n) for n in version.split()[-1].split(".")[:2])
    return TUNED if (major, minor) >= (2, 35) else TUNED.replace("1024 MiB", "32 MiB")


def _clean_env() -> dict[str, str]:
    """This environment without the user's allocator settings, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for name in ("GLIBC_TUNABLES", "LD_PRELOAD"):
        env.pop(name, None)
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _probe(mode: str) -> tuple[str, dict[str, list[int]]]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True, text=True, timeout=120, env=_clean_env(), check=True,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    return (lines[0] if len(lines) > 1 else ""), json.loads(lines[-1])


glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="needs Linux with glibc")


@pytest.mark.slow  # counts page faults of real processes: ~6 s
@glibc_only
def test_tuned_heap_serves_repeated_steps_without_page_faults() -> None:
    """Control: under glibc's defaults the four freed blocks trim the heap, so every
    repetition faults all its pages in again (28 672 pages, ±1 %). Tuned: after the first
    repetition (which maps the heap once) no C repetition takes more than 64 faults (the
    interpreter's own small allocations). Torch's tensors then reuse that heap: the Python
    objects allocated between them can shift a block past the old top once (≤ 5 508 pages
    seen), so the bound there is half of one repetition's pages over five repetitions (glibc's
    defaults took ≥ 47 K there). Two 48 MiB blocks (24 576 pages), run first while the
    heap's top is small: by default mapped afresh every time (±1 %), and where glibc took the
    1 GiB threshold not after the first time."""
    _, default = _probe("default")
    assert all(abs(f - _PAGES) <= 0.01 * _PAGES for f in default["c"]), default
    big_pages = 2 * (48 << 20) // 4096
    assert all(abs(f - big_pages) <= 0.01 * big_pages for f in default["big"]), default
    message, tuned = _probe("tuned")
    assert message == _expected_tuned()
    assert tuned["big"][0] >= 0.9 * big_pages  # the first use still maps its pages
    assert max(tuned["c"][1:]) <= 64, tuned
    assert sum(tuned["torch"][1:]) <= _PAGES // 2, tuned
    if message == TUNED:  # this glibc took 1 GiB
        assert sum(tuned["big"][1:]) <= 64, tuned


class FakeGlibc:
    """Stands for glibc: records ``mallopt`` calls (this pytest process keeps its allocator)
    and refuses the parameter numbers in ``refuse`` and the values in ``refuse_values``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refuse: set[int] = set()
        self.refuse_values: set[int] = set()

        def mallopt(param: int, value: int) -> int:
            self.calls.append((param, value))
            return 0 if param in self.refuse or value in self.refuse_values else 1

        def malloc_trim(pad: int) -> int:
            self.calls.append((0, pad))  # recorded as parameter 0
            return 1

        self.mallopt, self.malloc_trim = mallopt, malloc_trim


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> FakeGlibc:
    """``tune_malloc`` in a state where it has not run, on a fake glibc, with no allocator
    variables set and no other allocator loaded."""
    monkeypatch.setattr(allocator, "_applied", None)
    for name in (*allocator._USER_VARIABLES, "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    libc = FakeGlibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    monkeypatch.setattr(allocator, "_loaded_allocator", lambda: None)
    return libc


def test_sets_mmap_threshold_and_disables_trimming_once(fresh: FakeGlibc) -> None:
    assert allocator.tune_malloc() == TUNED
    assert fresh.calls == [(-3, 1 << 30), (-1, -1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    assert allocator.tune_malloc() == TUNED.replace("tuned", "already tuned")
    assert len(fresh.calls) == 2


def test_falls_back_to_the_documented_threshold(fresh: FakeGlibc) -> None:
    """A glibc that takes at most mallopt(3)'s documented 32 MiB (older releases)."""
    fresh.refuse_values = {1 << 30}
    assert allocator.tune_malloc() == TUNED.replace("1024 MiB", "32 MiB")
    assert fresh.calls == [(-3, 1 << 30), (-3, 32 << 20), (-1, -1)]


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("MALLOC_TRIM_THRESHOLD_", "1000000", "MALLOC_TRIM_THRESHOLD_ is set"),
        ("MALLOC_TOP_PAD_", "0", "MALLOC_TOP_PAD_ is set"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0",
         "GLIBC_TUNABLES sets glibc.malloc.trim_threshold"),
    ],
)  # fmt: skip
def test_leaves_configured_thresholds_alone(
    fresh: FakeGlibc, monkeypatch: pytest.MonkeyPatch, name: str, value: str, reason: str
) -> None:
    monkeypatch.setenv(name, value)
    assert allocator.tune_malloc() == f"malloc: left as configured ({reason})"
    assert fresh.calls == []


def test_finds_another_allocator_in_the_process_maps(tmp_path: Path) -> None:
    """An allocator mapped into the process (``/proc/self/maps``), however it was loaded;
    a library that only shares part of a name (Intel's tbbmalloc without its proxy) is none."""
    maps = tmp_path / "maps"
    line = "7f0000000000-7f0000001000 r-xp 00000000 08:01 42 {}\n"
    maps.write_text(line.format("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2") + "[heap]\n")
    assert allocator._loaded_allocator(maps) == "jemalloc"
    maps.write_text(line.format("/opt/intel/lib/libtbbmalloc.so.2"))
    assert allocator._loaded_allocator(maps) is None
    maps.write_text(line.format("/usr/lib/libtcmalloc_minimal.so.4 (deleted)"))
    assert allocator._loaded_allocator(maps) == "tcmalloc"


def test_leaves_another_allocator_alone(fresh: FakeGlibc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_loaded_allocator", lambda: "tcmalloc")
    assert allocator.tune_malloc() == "malloc: left as configured (tcmalloc is loaded)"
    assert fresh.calls == []


def test_this_process_has_no_other_allocator() -> None:
    """The real check on this process: the test environment runs on the system allocator."""
    if "LD_PRELOAD" in os.environ:
        pytest.skip("LD_PRELOAD is set here")
    assert allocator._loaded_allocator() is None


def test_unrelated_settings_do_not_count(fresh: FakeGlibc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0:glibc.cpu.x86_ibt=on")
    assert allocator.tune_malloc() == TUNED
    assert len(fresh.calls) == 2


def test_refusals_are_reported(fresh: FakeGlibc) -> None:
    fresh.refuse = {-3}
    assert allocator.tune_malloc() == "malloc: left as is (glibc refused M_MMAP_THRESHOLD)"
    fresh.refuse = {-1}
    assert allocator.tune_malloc().startswith("malloc: partly tuned (glibc refused M_TRIM")
    fresh.refuse = set()
    assert allocator.tune_malloc() == TUNED  # not marked as applied until both were taken


def test_not_glibc_is_left_as_is(fresh: FakeGlibc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.tune_malloc() == "malloc: left as is (not glibc)"
    assert fresh.calls == []


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


def test_release_heap_only_where_tuned(fresh: FakeGlibc) -> None:
    assert allocator.release_heap() is False and fresh.calls == []
    allocator.tune_malloc()
    assert allocator.release_heap() is True
    assert fresh.calls[-1] == (0, 0)  # malloc_trim(0)


_FORK_PROBE = (
    r"""
import ctypes, os, sys, time
from normfree.train.allocator import release_heap, tune_malloc
assert tune_malloc().startswith("malloc: tuned")
"""
    + _C_STEP
    + r"""
c_step()
if sys.argv[1] == "release":
    release_heap()
child = os.fork()
if child == 0:
    time.sleep(5)
    os._exit(0)
c_step()  # the parent's next step, while the child lives
with open(f"/proc/{child}/smaps_rollup") as f:
    print([int(line.split()[1]) for line in f if line.startswith("Private_Dirty")][0])
os.kill(child, 9)
"""
)


@pytest.mark.slow  # forks real processes over a 112 MiB heap: ~5 s
@glibc_only
@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs smaps_rollup")
def test_release_heap_keeps_a_forked_child_from_copying_the_kept_heap() -> None:
    """A child forked over the kept heap ends up owning a private copy of every page the
    parent's next step rewrites (112 MiB here: ≥ 100 MiB asserted); after ``release_heap`` it
    owns next to nothing of it (< 16 MiB: the interpreter's own pages)."""

    def child_private_kib(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FORK_PROBE, mode], capture_output=True,
                             text=True, timeout=60, env=_clean_env(), check=True)  # fmt: skip
        return int(out.stdout.strip().splitlines()[-1])

    assert child_private_kib("keep") >= 100 * 1024
    assert child_private_kib("release") < 16 * 1024


def test_trainer_releases_the_heap_before_workers_fork(
    make_cfg: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the train loader's workers start and before each evaluation pass (raw weights,
    EMA) with ``data.workers`` > 0; never with the default 0."""
    calls: list[int] = []
    monkeypatch.setattr("normfree.train.loop.release_heap", lambda: calls.append(1) or True)
    tiny = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=32"]
    train(make_cfg(*tiny, out="none"))
    assert calls == []
    cfg = make_cfg(*tiny, "data.workers=1", out="workers")
    train(cfg)
    assert len(calls) == 1 + (2 if cfg.ema.enabled else 1)


@glibc_only
@pytest.mark.slow  # a whole `normfree train` process; the in-process tests above cover the rest
def test_normfree_train_tunes_for_real(tmp_path: Path) -> None:
    """``normfree train`` in a fresh process on glibc: summary.json says it tuned."""
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "normfree", "train", "--out", str(run), *QUIET,
         "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=32"],
        capture_output=True, text=True, timeout=120, env=_clean_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "summary.json").read_text())["malloc"] == _expected_tuned()
