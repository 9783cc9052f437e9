"""glibc's ``malloc`` set up for a CPU training process: freed memory is kept for the next step.

By default glibc gives the top of its main heap back to the kernel whenever more than a sliding
threshold (at most 64 MiB) lies free there, and maps blocks above another sliding threshold
(at most 32 MiB) afresh each time. A training step frees and re-allocates the same few hundred
MiB every step, so the memory it hands back is faulted in again, page by page, on the next one:
7–60 K minor page faults per step for ResNet-50 and NFNet-F0 at batch 8 @128² on CPU, 0.5–1.6 M
at batch 32 @224², where they cost a quarter of the step (docs/benchmarks.md, "glibc's allocator
tuned by default"). Which steps fault depends on where the heap's top happens to lie, so it
also makes CPU timings jumpy.

:func:`tune_malloc` calls glibc's public ``mallopt(3)``: blocks up to 1 GiB come from the heap
(up to 32 MiB, the limit ``mallopt(3)`` documents for 64-bit, on a glibc that refuses more),
and the main heap is never trimmed. The process then keeps its peak heap until it exits, which
is what a training loop needs anyway: 0–30 MiB more peak RSS at batch 8 @128², 12–22 % more
at batch 32 @224² (measured; fragmentation of the kept heap, presumably). Not covered: blocks
above the threshold, and the heaps of threads other than the main one, which may still shrink;
jemalloc or tcmalloc (``LD_PRELOAD``) cover those too.

A forked child shares the kept heap copy-on-write, so the parent's next step, writing into it,
would copy every page: one more copy of the heap in memory while DataLoader workers live.
:func:`release_heap` (``malloc_trim(0)``) gives the free part back first; the training loop
calls it before it starts workers.

It is a setting of the whole process that stays after training returns, and forked children
(DataLoader workers) inherit it; so the training loop applies it only on CPU and only where
``train.tune_malloc`` is true (the default). It leaves the allocator alone where the user
already chose: glibc's threshold variables (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_``) or the matching
``GLIBC_TUNABLES`` entries in the environment, or another allocator in the process
(jemalloc, tcmalloc, mimalloc, …, however loaded).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["release_heap", "tune_malloc"]

# mallopt(3) parameter numbers (<malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# tried in turn: 1 GiB (glibc >= 2.35 takes any value: its cap went with glibc bug 27801),
# else the cap of older glibc, mallopt(3)'s documented 64-bit limit
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
_NO_TRIM = -1  # "Setting M_TRIM_THRESHOLD to -1 disables trimming completely" (mallopt(3))

# what a user sets to choose these thresholds (not e.g. MALLOC_ARENA_MAX, which does not clash)
_USER_VARIABLES = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_TRIM_THRESHOLD_",
)
_USER_TUNABLES = (
    "glibc.malloc.hugetlb",
    "glibc.malloc.mmap_max",
    "glibc.malloc.mmap_threshold",
    "glibc.malloc.top_pad",
    "glibc.malloc.trim_threshold",
)
# file-name prefixes of the libraries that replace malloc (tbbmalloc only through its proxy)
_OTHER_ALLOCATORS = ("libjemalloc", "libtcmalloc", "libmimalloc", "libhoard", "libsnmalloc",
                     "libtbbmalloc_proxy", "libscudo", "libclang_rt.scudo",
                     "librpmalloc")  # fmt: skip

_applied: str | None = None  # the message of the tuning done, once done


def _tuned(threshold: int) -> str:
    return f"malloc: tuned (heap kept, blocks up to {threshold >> 20} MiB from the heap)"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc itself (not whatever else exports ``mallopt``) if this process runs on it, with
    the prototypes of ``mallopt`` and ``malloc_trim`` declared, else None (musl, macOS,
    Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname on every Linux architecture
    except (ValueError, OSError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def _loaded_allocator(maps: Path = Path("/proc/self/maps")) -> str | None:
    """The name of another allocator mapped into this process (``LD_PRELOAD``,
    ``/etc/ld.so.preload`` or a dependency), if any."""
    try:
        text = maps.read_text()
    except OSError:
        text = os.environ.get("LD_PRELOAD", "")
    libraries = {part.rsplit("/", 1)[-1].lower()
                 for line in text.splitlines() for part in line.split() if "/" in part}  # fmt: skip
    for prefix in _OTHER_ALLOCATORS:
        if any(lib.startswith(prefix) for lib in libraries):
            return prefix.removeprefix("lib")
    return None


def _user_choice(environ: Mapping[str, str]) -> str | None:
    """What in the environment already chose the thresholds, if anything."""
    for name in _USER_VARIABLES:
        if name in environ:
            return f"{name} is set"
    tunables = environ.get("GLIBC_TUNABLES", "")
    for name in _USER_TUNABLES:
        if name in tunables:
            return f"GLIBC_TUNABLES sets {name}"
    return None


def release_heap() -> bool:
    """Give the free part of the kept heap back to the kernel (glibc's ``malloc_trim(0)``),
    before forking DataLoader workers; the next step faults it in once. True where it ran, i.e.
    after :func:`tune_malloc` tuned this process; False (nothing done) otherwise."""
    libc = _glibc() if _applied is not None else None
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def tune_malloc() -> str:
    """Keep freed heap memory for reuse (glibc only; process-wide, for the process's lifetime).

    Sets ``M_MMAP_THRESHOLD`` to 1 GiB (32 MiB where glibc refuses that) and
    ``M_TRIM_THRESHOLD`` to -1 (no trimming) through ``mallopt(3)``, so the memory a training
    step frees serves the next step without page faults. Returns one line saying what was done
    or why nothing was: not glibc, the environment already sets the thresholds (``MALLOC_*_``
    variables, ``GLIBC_TUNABLES``), another allocator is loaded, or ``mallopt`` refused. Safe
    to call more than once."""
    global _applied
    if _applied is not None:
        return _applied.replace("tuned", "already tuned", 1)
    chosen = _user_choice(os.environ)
    if chosen is None and (other := _loaded_allocator()) is not None:
        chosen = f"{other} is loaded"
    if chosen is not None:
        return f"malloc: left as configured ({chosen})"
    libc = _glibc()
    if libc is None:
        return "malloc: left as is (not glibc)"
    threshold = next((t for t in _MMAP_THRESHOLDS if libc.mallopt(_M_MMAP_THRESHOLD, t) == 1), 0)
    if not threshold:
        return "malloc: left as is (glibc refused M_MMAP_THRESHOLD)"
    if libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM) != 1:  # never seen: glibc takes any value
        return ("malloc: partly tuned (glibc refused M_TRIM_THRESHOLD; its sliding thresholds "
                "are now off, so the heap may trim more often than by default)")  # fmt: skip
    _applied = _tuned(threshold)
    return _applied
