"""``torch.compile`` backends shared by the tests that check what a compiled graph holds
(``tests/nn/test_pointwise_conv.py``, ``tests/nn/test_max_pool_same.py``), and the context in
which those tests call ``torch.export`` themselves."""

from __future__ import annotations

import contextlib

import torch

from normfree.nn.eager_forms import export_trace

__all__ = ["direct_export", "graphs_seen"]


def direct_export() -> contextlib.AbstractContextManager:
    """Nothing where this torch tells an export from a compile (``torch.compiler.is_exporting``,
    torch 2.7), so that a direct ``torch.export`` is tested as a user runs it; before that,
    normfree's own marker (:func:`normfree.nn.eager_forms.export_trace`), as its deploy runs
    every export."""
    if hasattr(torch.compiler, "is_exporting"):
        return contextlib.nullcontext()
    return export_trace()


def graphs_seen(seen: list[str]):
    """A ``torch.compile`` backend that records each captured graph's code and runs it."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        seen.append(gm.code)
        return gm.forward

    return backend
