"""``torch.compile`` backends shared by the tests that check what a compiled graph holds
(``tests/nn/test_pointwise_conv.py``, ``tests/nn/test_max_pool_same.py``)."""

from __future__ import annotations

import torch

__all__ = ["graphs_seen"]


def graphs_seen(seen: list[str]):
    """A ``torch.compile`` backend that records each captured graph's code and runs it."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        seen.append(gm.code)
        return gm.forward

    return backend
