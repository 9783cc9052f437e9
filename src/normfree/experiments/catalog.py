"""The built-in experiments; importing this module registers them (in ``--list`` order)."""

from __future__ import annotations

from normfree.experiments import agc, depth, msr, proxy_norm, small_batch

__all__ = ["BUILTIN"]

BUILTIN = [e.EXPERIMENT for e in (small_batch, agc, depth, proxy_norm, msr)]
