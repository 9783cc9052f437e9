"""glibc's ``malloc`` set up for a CPU training process: freed memory is kept for the next step.

By default glibc gives the top of its heap back to the kernel whenever more than a sliding
threshold (at most 64 MiB) lies free there, and maps blocks above another sliding threshold
afresh each time. A training step frees and re-allocates the same few hundred MiB every step,
so the memory it hands back is faulted in again, page by page, on the next one: 7–60 K minor
page faults per step for ResNet-50 and NFNet-F0 at batch 8 @128² on CPU, which cost 2–10 % of
the step (docs/benchmarks.md, "glibc's allocator tuned by default"). Which steps fault depends
on where the heap's top happens to lie, so it also makes CPU timings jumpy.

:func:`tune_malloc` calls glibc's public ``mallopt(3)``: blocks up to 32 MiB (glibc's largest
setting) come from the heap, and the heap is never trimmed. The process then keeps its peak
heap until it exits, which is what a training loop needs anyway (0–30 MiB more peak RSS
for nf_resnet50 and nfnet_f0). Allocations above 32 MiB are still mapped and unmapped per
use; jemalloc or tcmalloc (``LD_PRELOAD``) avoid that too.

It is a setting of the whole process and stays after training returns, so the training loop
applies it only on CPU and only where ``train.tune_malloc`` is true (the default); it leaves
the allocator alone where the user already chose: glibc's ``MALLOC_*_`` variables or
``GLIBC_TUNABLES`` malloc entries in the environment, or another allocator preloaded.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["tune_malloc"]

# mallopt(3) parameter numbers (<malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (4 MiB · sizeof(long))
NO_TRIM = -1  # "Setting M_TRIM_THRESHOLD to -1 disables trimming completely" (mallopt(3))

_USER_VARIABLES = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_TRIM_THRESHOLD_",
)
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc", "hoard", "snmalloc")

_applied = False


def _glibc() -> ctypes.CDLL | None:
    """The C library of this process if it is glibc (which has ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None  # musl and others: no glibc heap to tune
    return libc


def _user_choice(environ: os._Environ[str] | dict[str, str]) -> str | None:
    """What in the environment already chose the allocator's behaviour, if anything."""
    for name in _USER_VARIABLES:
        if name in environ:
            return f"{name} is set"
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc tunables"
    preload = environ.get("LD_PRELOAD", "").lower()
    for name in _OTHER_ALLOCATORS:
        if name in preload:
            return f"{name} is preloaded"
    return None


def tune_malloc() -> str:
    """Keep freed heap memory for reuse (glibc only; process-wide, for the process's lifetime).

    Sets ``M_MMAP_THRESHOLD`` to 32 MiB and ``M_TRIM_THRESHOLD`` to -1 (no trimming) through
    ``mallopt(3)``, so the memory a training step frees serves the next step without page
    faults. Returns one line saying what was done or why nothing was: not glibc, the
    environment already configures the allocator (``MALLOC_*_``, ``GLIBC_TUNABLES``, a
    preloaded jemalloc/tcmalloc), or ``mallopt`` refused. Safe to call more than once."""
    global _applied
    if _applied:
        return "malloc: already tuned (heap kept, blocks up to 32 MiB from the heap)"
    chosen = _user_choice(os.environ)
    if chosen is not None:
        return f"malloc: left as configured ({chosen})"
    libc = _glibc()
    if libc is None:
        return "malloc: left as is (not glibc)"
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return "malloc: left as is (glibc refused M_MMAP_THRESHOLD)"
    if libc.mallopt(_M_TRIM_THRESHOLD, NO_TRIM) != 1:
        return "malloc: partly tuned (glibc refused M_TRIM_THRESHOLD)"
    _applied = True
    return "malloc: tuned (heap kept, blocks up to 32 MiB from the heap)"
