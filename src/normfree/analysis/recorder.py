"""Forward hooks that reduce activations at measurement points, and always come off again.

:func:`record_points` runs one forward pass with a hook on every point (and on every point's
residual branch), applies a reducer to each activation as it is produced (activations are never
kept), and removes every hook in a ``finally`` block, so a forward pass that raises leaves the
model without hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import torch
from torch import nn

from normfree.analysis.points import PointSpec, resolve_modules
from normfree.nn.residual import plain_forward

__all__ = ["PointRecord", "attach_branches", "first_tensor", "record_points"]

T = TypeVar("T")


def first_tensor(value: Any, where: str) -> torch.Tensor:
    """The tensor a module produced (the first element of a tuple/list output)."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} produced {type(value).__name__}, not a tensor; name another")
    if not value.is_floating_point():
        raise TypeError(f"{where} produced a {value.dtype} tensor; analysis needs floating point")
    return value


class PointRecord(dict):
    """``{"value": reduced output, "branch": reduced branch output or None, "order": int}``."""


def attach_branches(
    model: nn.Module, specs: Sequence[PointSpec], branch_points: Sequence[str] | None
) -> list[PointSpec]:
    """Give each point the residual-branch module named (by glob) in ``branch_points``.

    Each matched module is assigned to the point whose name is its nearest enclosing prefix
    (``layer1.0.bn2`` belongs to point ``layer1.0``); a branch module inside no point, or two
    branch modules in one point, is an error.
    """
    if not branch_points:
        return list(specs)
    by_name = {s.name: i for i, s in enumerate(specs) if not s.use_input}
    out = list(specs)
    taken: dict[int, str] = {}
    for name, module in resolve_modules(model, branch_points, what="branch point"):
        owners = [n for n in by_name if name.startswith(n + ".")]
        if not owners:
            raise ValueError(
                f"branch point {name!r} lies inside none of the measurement points "
                f"({', '.join(by_name) or 'none'}); name the last module of a block's branch"
            )
        owner = max(owners, key=len)
        idx = by_name[owner]
        if idx in taken:
            raise ValueError(
                f"point {owner!r} got two branch points, {taken[idx]!r} and {name!r}; "
                "name only the last module of each residual branch"
            )
        taken[idx] = name
        out[idx] = replace(out[idx], branch=module)
    return out


def record_points(
    model: nn.Module,
    run: Callable[[], Any],
    specs: Sequence[PointSpec],
    reduce: Callable[[torch.Tensor, str], T],
    reduce_branch: Callable[[torch.Tensor, str], Any] | None = None,
) -> tuple[dict[str, PointRecord], Any]:
    """Call ``run()`` (which runs ``model``) with hooks on ``specs``; return the reduced values
    per point name, in the order the points fired, and ``run()``'s result.

    Normalizer-free blocks run in their plain form (:func:`normfree.nn.plain_forward`), so a
    point inside a block sees the paper's quantities. Raises ``ValueError`` if a point does not
    run, or runs more than once (a module reused in the forward pass; name a module that runs
    once).
    """
    records: dict[str, PointRecord] = {}
    calls: dict[str, int] = {s.name: 0 for s in specs}
    branch_calls: dict[str, int] = {}
    counter = [0]
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def on_point(spec: PointSpec) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any = None) -> None:
            calls[spec.name] += 1
            if calls[spec.name] > 1:
                return
            value = args if spec.use_input else output
            tensor = first_tensor(value, f"point {spec.name!r}")
            rec = records.setdefault(spec.name, PointRecord(branch=None))
            rec["value"] = reduce(tensor, spec.name)
            rec["order"] = counter[0]
            counter[0] += 1

        return hook

    def on_branch(spec: PointSpec) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            branch_calls[spec.name] = branch_calls.get(spec.name, 0) + 1
            if branch_calls[spec.name] > 1 or reduce_branch is None:
                return
            tensor = first_tensor(output, f"branch of {spec.name!r}")
            rec = records.setdefault(spec.name, PointRecord(branch=None))
            rec["branch"] = reduce_branch(tensor, spec.name)

        return hook

    try:
        for spec in specs:
            if spec.use_input:
                handles.append(spec.module.register_forward_pre_hook(on_point(spec)))
            else:
                handles.append(spec.module.register_forward_hook(on_point(spec)))
            if spec.branch is not None and reduce_branch is not None:
                handles.append(spec.branch.register_forward_hook(on_branch(spec)))
        with plain_forward(model):  # NF blocks' folded scales would skip the branch probes
            result = run()
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n, c in calls.items() if c == 0]
    if missing:
        raise ValueError(
            f"points never ran in the forward pass of {type(model).__name__}: {missing}"
        )
    reused = {n: c for n, c in {**calls, **branch_calls}.items() if c > 1}
    if reused:
        raise ValueError(
            f"modules ran more than once in one forward pass (calls per point: {reused}); "
            "a reused module (e.g. a shared activation) has no single output: name another one"
        )
    ordered = sorted(records.items(), key=lambda item: item[1]["order"])
    return dict(ordered), result
