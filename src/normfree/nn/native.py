"""Optional native CPU kernels, built on first use with ``torch.utils.cpp_extension``.

Two kernel pairs, registered as PyTorch operators (``csrc/library.cpp``; the kernels in
``csrc/kernels.cpp``):

* Scaled Weight Standardization (Brock et al. 2021a, eq. 2) forward and backward over the rows
  of a weight (``csrc/scaled_ws.h``). Each output unit's row is read from memory once and stays
  in L1 for its statistics and its output (the later sweeps over it come from cache, while the
  next row is requested), so each pass moves the fewest bytes: on a 2-core Xeon the backward
  runs at the speed of a two-input add over the weights and takes 13 ms of an nf_resnet50
  training step against group normalization's 18 ms, the op path's form (docs/benchmarks.md,
  "Eighteenth pass"). The backward of a parameter also sums each unit's gradient norm
  while it writes the gradient, and adaptive gradient clipping reads those norms
  (:func:`normfree.nn.unit_norms.unit_grad_norms_from_backward`) instead of a pass over the
  gradients: AGC's cost in an nf_resnet50 step about halves. The numbers are the formula's to
  float rounding: float64 equal to the analytic function to ~1e-14, and the ``N·Var`` floor
  handled exactly as the official code (the variance term of the backward vanishes where it is
  active). The same row sweep can apply an optimizer step instead of writing ∂L/∂W
  (``csrc/scaled_ws_update.h``; :func:`normfree.optim.update_in_backward`). Under CPU
  autocast in bfloat16 a float32 weight's Ŵ is written as bfloat16 and the bfloat16 gradient
  read as it comes: the bits of autocast's casts (NaN payloads aside), without their two
  passes over the weights.
* The tanh-GELU of NFNets (:class:`normfree.nn.activations.TanhGELU`, float32) forward and
  backward in one pass each (``csrc/tanh_gelu.h``): 2–3× faster than the op path and PyTorch's
  kernel, within a few ulps of the float64 formula; ≈ 3.5 % of an NFNet-F0 training step on CPU.

Off by default. Turning them on compiles the extension once per machine (about 20 s on two
cores, with a C++ compiler and OpenMP; cached under ``~/.cache/torch_extensions`` or
``TORCH_EXTENSIONS_DIR``, one folder per PyTorch version) and loads it as PyTorch operators,
``torch.ops.normfree_native_<tag>.*`` (``torch.profiler`` names them). Each kernel pair can be
chosen alone (:data:`KERNELS`): which pays depends on the CPU and the model (on a Xeon host of
docs/benchmarks.md the Scaled-WS pair makes nf_resnet50 and NFNet-F0 steps 2–5 % faster; on an
AMD EPYC host, before its kernels were fixed to run at memory speed, it cost NFNet-F0 up to
≈ 3 %, while the tanh-GELU pair gained ≈ 3.5 %). ``normfree train`` takes the choice as
``train.native_kernels``:

    import normfree.nn.native as native
    native.set_native_kernels(True)      # all; or NORMFREE_NATIVE_KERNELS=1 in the environment
    native.set_native_kernels(["tanh_gelu"])  # only these; NORMFREE_NATIVE_KERNELS=tanh_gelu
    with native.native_kernels(False):   # temporarily back to the PyTorch-op path
        ...

If the build fails (no compiler, no OpenMP) a warning says why and the PyTorch-op path is
used; nothing else changes. Only eager CPU float32/float64 weights and dense float32 GELU
inputs take the kernels; tracing, ``torch.compile``, other devices and dtypes keep their paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "KERNELS",
    "environment_kernels",
    "kernel_names",
    "native_kernels",
    "native_kernels_enabled",
    "set_native_kernels",
]

_CSRC = Path(__file__).with_name("csrc")
# two translation units, compiled in parallel: the operators' registration and the kernels
_SOURCES = (_CSRC / "library.cpp", _CSRC / "kernels.cpp")
_ENV = "NORMFREE_NATIVE_KERNELS"

KERNELS: tuple[str, ...] = ("scaled_ws", "tanh_gelu")
"""The kernel pairs, by the name :func:`set_native_kernels` and ``NORMFREE_NATIVE_KERNELS``
take: Scaled WS (``csrc/scaled_ws.h``) and the tanh-GELU (``csrc/tanh_gelu.h``)."""


def kernel_names(text: str) -> tuple[str, ...]:
    """The names in ``text`` separated by commas or ``+`` (``"scaled_ws+tanh_gelu"``), in
    order, blanks dropped; not checked against :data:`KERNELS`."""
    return tuple(name.strip() for name in text.replace("+", ",").split(",") if name.strip())


def _unknown(names: Collection[str]) -> list[str]:
    """The names in ``names`` that are not in :data:`KERNELS`, sorted."""
    return sorted(set(names) - set(KERNELS))


def _known(names: Collection[str]) -> frozenset[str]:
    """``names`` as a set, or a ``ValueError`` naming the unknown ones and the choices."""
    unknown = _unknown(names)
    if unknown:
        raise ValueError(f"unknown native kernels {unknown}; choose from {', '.join(KERNELS)}")
    return frozenset(names)


def _from_environment(value: str, warn: bool = True) -> frozenset[str]:
    """The kernels ``NORMFREE_NATIVE_KERNELS`` names: ``1``/``true``/``yes``/``on`` all of
    them, unset/``0``/``false``/``no``/``off`` none, else a list of :data:`KERNELS` separated
    by commas or ``+`` (an unknown name is skipped, with a warning where ``warn``)."""
    value = value.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return frozenset(KERNELS)
    if value in ("", "0", "false", "no", "off"):
        return frozenset()
    names = set(kernel_names(value))
    unknown = _unknown(names)
    if unknown and warn:
        warnings.warn(
            f"{_ENV} names unknown native kernels {unknown}; known: {', '.join(KERNELS)} "
            "(or 1 for all); ignoring them",
            RuntimeWarning,
            stacklevel=2,
        )
    return frozenset(names & set(KERNELS))


_extension: ModuleType | None = None
_build_failed = False
_enabled: frozenset[str] = _from_environment(os.environ.get(_ENV, ""))


def environment_kernels() -> frozenset[str]:
    """The kernels ``NORMFREE_NATIVE_KERNELS`` asks for now (see :func:`_from_environment`),
    whether or not they have been built."""
    return _from_environment(os.environ.get(_ENV, ""), warn=False)


def _sources_digest() -> str:
    """A digest of every file in ``csrc``: PyTorch rebuilds a cached extension when its
    sources or flags change, but it reads only the ``.cpp`` it is given, so the headers'
    digest goes into the flags."""
    digest = hashlib.sha256()
    for path in sorted(_CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _extension_name() -> str:
    """The extension's name, which is also its build folder: one per PyTorch version and
    Python ABI. A build is tied to the ABI of the torch that compiled it, while PyTorch's cache
    key covers only the sources and flags (an upgraded torch would load the old build), and
    releases lock that folder differently: torch 2.14 leaves its advisory lock's file behind,
    which the lock-file baton of torch 2.11 takes for a build in progress and waits on
    forever."""
    tag = f"{torch.__version__} {sys.implementation.cache_tag}"
    return "normfree_native_" + hashlib.sha256(tag.encode()).hexdigest()[:10]


_STALE_LOCK_S = 300.0  # a build takes ~20 s; a lock file this old was left by a killed build


def _lock_age(lock: Path) -> float | None:
    """Seconds since ``lock`` was created, or None when there is none (also when its holder
    removes it while we look)."""
    try:
        return time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None


def _clear_stale_lock(lock: Path) -> None:
    """PyTorch releases before 2.14 guard a build with a lock *file*
    (``torch.utils.file_baton.FileBaton``) whose mere existence makes every later build wait,
    forever when the building process was killed (SIGKILL, the OOM killer; a Ctrl-C releases
    it). Before handing over to PyTorch: wait while another process's lock is younger than
    any build takes, then remove a lock that is older, with a warning. A live build slower
    than ``_STALE_LOCK_S`` would be built twice; none has come close (~20 s)."""
    from torch.utils import cpp_extension

    if not hasattr(cpp_extension, "FileBaton"):  # torch 2.14: an advisory lock, freed on exit
        return
    warned = False
    while (age := _lock_age(lock)) is not None and age < _STALE_LOCK_S:
        if not warned and age > 10.0:
            warnings.warn(f"waiting for another process's build of the native kernels (lock "
                          f"{lock}; taken for stale after {_STALE_LOCK_S:.0f} s)",
                          RuntimeWarning, stacklevel=5)  # fmt: skip
            warned = True
        time.sleep(0.5)
    if age is not None:
        lock.unlink(missing_ok=True)
        warnings.warn(
            f"removed a stale build lock left by a killed build of the native kernels "
            f"({lock}, {age:.0f} s old); building them again",
            RuntimeWarning,
            stacklevel=5,
        )


def _build_directory() -> Path:
    """The extension's build folder (under ``TORCH_EXTENSIONS_DIR`` or PyTorch's default root),
    created if missing, with a stale lock file cleared (:func:`_clear_stale_lock`)."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    folder = Path(root) / _extension_name()
    folder.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(folder / "lock")
    return folder


_OPERATORS = (
    "scaled_ws_forward",
    "scaled_ws_backward",
    "scaled_ws_backward_sgd",
    "scaled_ws_backward_adam",
    "tanh_gelu_forward",
    "tanh_gelu_backward",
)


def _operators(name: str) -> ModuleType:
    """The loaded library's operator namespace ``torch.ops.<name>`` (a module whose attributes
    are the operators of ``csrc/library.cpp``); an ``AttributeError`` names an operator the
    library did not register."""
    namespace = getattr(torch.ops, name)
    for op in _OPERATORS:
        getattr(namespace, op)  # raises for an operator that is not registered
    return namespace


def _build() -> ModuleType | None:
    """The compiled extension, building it on the first call; None (with one warning) when it
    cannot be built."""
    global _extension, _build_failed
    if _extension is not None or _build_failed:
        return _extension
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns about CUDA_HOME on CPU-only machines
    try:
        from torch.utils.cpp_extension import load

        name = _extension_name()
        load(  # loads the library into the process: its operators are torch.ops.<name>.*
            name=name,
            build_directory=str(_build_directory()),
            sources=[str(path) for path in _SOURCES],
            is_python_module=False,
            # -fno-trapping-math: GCC may then vectorise loops with selects (tanh_gelu.h);
            # -fno-math-errno: and loops with a square root (Adam's step, scaled_ws_update.h),
            # which it otherwise calls one element at a time to set errno for a negative input.
            # No result changes: the exception flags and errno go unmodelled
            extra_cflags=[
                "-O3",
                "-fopenmp",
                "-fno-trapping-math",
                "-fno-math-errno",
                f"-DNORMFREE_SOURCES={_sources_digest()}",
            ],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
        _extension = _operators(name)
    except Exception as exc:  # any build or load failure: fall back, say why once
        _build_failed = True
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warnings.warn(
            f"normfree native kernels are unavailable ({type(exc).__name__}: {reason[:200]}); "
            "using the PyTorch-op path (set_native_kernels(False), unset "
            f"{_ENV} or pass train.native_kernels=false to silence this)",
            RuntimeWarning,
            stacklevel=3,
        )
    finally:
        log.setLevel(level)
    return _extension


def _selection(enabled: bool | Collection[str]) -> frozenset[str]:
    if isinstance(enabled, bool):
        return frozenset(KERNELS) if enabled else frozenset()
    if isinstance(enabled, str) or not isinstance(enabled, Collection):
        raise TypeError(
            "enabled must be a bool or a collection of kernel names "
            f"({', '.join(KERNELS)}), got {type(enabled).__name__}"
        )
    return _known(enabled)


def set_native_kernels(enabled: bool | Collection[str]) -> bool:
    """Use the native CPU kernels (``True``: all of :data:`KERNELS`; a collection of names:
    those, the others on the PyTorch-op path) or the PyTorch-op path only (``False``) from now
    on.

    Turning kernels on builds the extension if this machine has no cached build yet. Returns
    whether the chosen kernels are in use afterwards (``False`` when the build failed: a
    ``RuntimeWarning`` says why; ``False`` also for ``False`` or an empty choice)."""
    global _enabled
    chosen = _selection(enabled)
    _enabled = chosen if chosen and _build() is not None else frozenset()
    return bool(_enabled)


def native_kernels_enabled(kernel: str | None = None) -> bool:
    """Whether any native kernel (``kernel=None``) or the named one of :data:`KERNELS` runs on
    eager CPU (without building anything)."""
    chosen = _enabled if kernel is None else _enabled & _known({kernel})
    return bool(chosen) and _extension is not None


@contextlib.contextmanager
def native_kernels(enabled: bool | Collection[str] = True) -> Iterator[bool]:
    """``with native_kernels(choice):`` runs its body with the native kernels chosen as in
    :func:`set_native_kernels` and restores the previous choice on exit (also when the body
    raises); yields whether the chosen kernels are in use."""
    global _enabled
    previous = _enabled
    try:
        yield set_native_kernels(enabled)
    finally:
        _enabled = previous


def extension(kernel: str) -> ModuleType | None:
    """The loaded extension when ``kernel`` (one of :data:`KERNELS`) is switched on (building
    it on first use under ``NORMFREE_NATIVE_KERNELS``), else None. Used by
    :mod:`normfree.nn.ws_functional` (``"scaled_ws"``) and :mod:`normfree.nn.activations`
    (``"tanh_gelu"``)."""
    if kernel not in _enabled:
        return None
    return _extension if _extension is not None else _build()
