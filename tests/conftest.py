"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.jit._builtins

# A PyTorch flake, worked around for the test session only: TorchScript's table of builtins is
# keyed by id(), and torch.ops registers every operator it looks up there
# (torch._ops._get_packet → torch.jit._builtins._register_builtin) without keeping the operator
# alive. Once an operator library is torn down (custom ops, ONNX export's symbolic ops), a
# recycled id can make a module's plain attribute (nn.Conv2d's _reversed_padding_repeated_twice)
# look like a builtin, and torch.jit.script fails with "builtin cannot be used as a value"
# (about 1 fresh-clone run in 6). Keeping every registered object alive makes ids unique.
_REGISTERED: list[object] = []
_register_builtin = torch.jit._builtins._register_builtin


def _register_and_keep(fn: object, op: str) -> None:
    _REGISTERED.append(fn)
    _register_builtin(fn, op)


torch.jit._builtins._register_builtin = _register_and_keep

# Under pytest-xdist (``-n 2``) each worker process takes one intra-op thread, so that the
# workers do not oversubscribe the cores they share.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test on one intra-op thread (tiny models run fastest, and steadiest on a shared
    CPU, that way), then restore the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def accel() -> torch.device:
    """The accelerator for the device checks (``tests/**/test_cuda*.py``): CUDA device 0, or the
    test is skipped. ``NORMFREE_TEST_ACCEL=cpu`` runs those checks on the CPU instead, to check
    the tests themselves on a machine without a GPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if os.environ.get("NORMFREE_TEST_ACCEL") == "cpu":
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (NORMFREE_TEST_ACCEL=cpu runs it on the CPU)")
