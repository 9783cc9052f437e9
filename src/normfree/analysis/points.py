"""Where to measure: module-name globs and residual-block discovery for any PyTorch model.

A *measurement point* is a submodule whose output is recorded during one forward pass. For
normfree models the points are known from the model contract (``stem`` and every
:class:`normfree.nn.ResidualBlock`, whose ``branch_probe`` gives the residual-branch output).
For other models (torchvision, timm, your own) the points are named by glob, or found with
:func:`find_residual_blocks`.

Glob semantics (:func:`glob_match`), made for dotted module names:

* ``*`` matches any run of characters **except** ``.`` (one name component, or part of one);
* ``?`` matches one character except ``.``;
* ``**`` matches anything, dots included (any number of components);
* ``[abc]`` / ``[!abc]`` match one character in / not in the set;
* every other character matches itself.

So ``"layer?.*"`` matches ``layer1.0`` but not ``layer1.0.conv1``. This differs from
:mod:`fnmatch`, whose ``*`` crosses dots (``"stages.*.*"`` would match every submodule).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from normfree.nn.residual import ResidualBlock

__all__ = [
    "KNOWN_RESIDUAL_CLASSES",
    "SHORTCUT_ATTRIBUTES",
    "PointSpec",
    "default_points",
    "find_residual_blocks",
    "glob_match",
    "glob_to_regex",
    "points_from_patterns",
    "resolve_modules",
]

# Class names of residual blocks in common libraries (torchvision, timm, pytorch-cifar style).
KNOWN_RESIDUAL_CLASSES: frozenset[str] = frozenset(
    {
        "BasicBlock",
        "Bottleneck",
        "PreActBlock",
        "PreActBottleneck",
        "PreActBasicBlock",
        "ResBlock",
        "ResidualBlock",
        "ResNetBlock",
        "NormFreeBlock",
        "NFResBlock",
        "CNBlock",
        "ConvNeXtBlock",
    }
)
# A module holding one of these attributes (a module, or ``None`` when the block keeps the
# identity shortcut, as torchvision's ``downsample=None``) is taken for a residual block.
SHORTCUT_ATTRIBUTES: tuple[str, ...] = ("downsample", "shortcut", "skip", "proj_shortcut")


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a dotted-name glob (see the module docstring) to a regular expression."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"a point pattern must be a non-empty string, got {pattern!r}")
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                out.append(".*")
                i += 2
                continue
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            j = pattern.find("]", i + 2 if i + 1 < n and pattern[i + 1] in "!^" else i + 1)
            if j < 0:
                raise ValueError(f"unclosed '[' in point pattern {pattern!r}")
            body = pattern[i + 1 : j]
            negate = body[:1] in ("!", "^")
            body = re.escape(body[1:] if negate else body).replace(r"\-", "-")
            out.append(f"[^.{body}]" if negate else f"[{body}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def glob_match(name: str, pattern: str) -> bool:
    """True when the dotted module ``name`` matches the glob ``pattern`` as a whole."""
    return glob_to_regex(pattern).fullmatch(name) is not None


def resolve_modules(
    model: nn.Module, patterns: str | Iterable[str], what: str = "point"
) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` whose qualified names match any of ``patterns``, in registration
    order, without duplicates. Raises ``ValueError`` for a pattern that matches nothing."""
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise ValueError(f"no {what} patterns given")
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        regex = glob_to_regex(pattern)
        hits = [(n, m) for n, m in named if regex.fullmatch(n)]
        if not hits:
            sample = ", ".join(n for n, _ in named[:12])
            raise ValueError(
                f"{what} pattern {pattern!r} matches no module of {type(model).__name__} "
                f"('*' does not cross dots; use '**' for that). Some module names: {sample}"
            )
        for n, m in hits:
            chosen.setdefault(n, m)
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(chosen.items(), key=lambda item: order[item[0]])


def _known_block(module: nn.Module) -> bool:
    """A residual block by type: a :class:`ResidualBlock` or a known residual class name."""
    return isinstance(module, ResidualBlock) or type(module).__name__ in KNOWN_RESIDUAL_CLASSES


def _looks_residual(module: nn.Module) -> bool:
    if isinstance(module, ResidualBlock):
        return True
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    if type(module).__name__ in KNOWN_RESIDUAL_CLASSES:
        return True
    return any(
        attr in module._modules or (attr in module.__dict__ and module.__dict__[attr] is None)
        for attr in SHORTCUT_ATTRIBUTES
    )


def _is_stage(module: nn.Module) -> bool:
    """A module taken for a block only through a shortcut attribute that holds residual blocks
    below it is a *stage* (timm's ``ConvNeXtStage``: a ``downsample`` then ``blocks``)."""
    return not _known_block(module) and any(
        _looks_residual(m) for n, m in module.named_modules() if n
    )


def _has_projection(module: nn.Module) -> bool:
    if isinstance(module, ResidualBlock):
        return bool(module.is_transition)
    for attr in SHORTCUT_ATTRIBUTES:
        sub = module._modules.get(attr)
        if sub is not None and not isinstance(sub, nn.Identity):
            return True
    return False


def find_residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual blocks of ``model`` in registration order (outermost only).

    A block is a :class:`normfree.nn.ResidualBlock`, a module whose class name is in
    :data:`KNOWN_RESIDUAL_CLASSES`, or a module with one of :data:`SHORTCUT_ATTRIBUTES`
    (``downsample``, ``shortcut``, ...) as a child or set to ``None``, as in torchvision and timm.
    Containers and the model itself are never blocks; blocks nested in a block are skipped. A
    module found only through a shortcut attribute that holds blocks below it is a stage (timm's
    ``ConvNeXtStage`` has a ``downsample`` and ``blocks``): its blocks are returned instead.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f + ".") for f, _ in found):
            continue
        if _looks_residual(module) and not _is_stage(module):
            found.append((name, module))
    return found


@dataclass(frozen=True)
class PointSpec:
    """One measurement point, resolved.

    Attributes:
        name: the module's qualified name (``"<block>:input"`` for a point read from the input
            of the first residual block when the model has no ``stem``).
        module: the module whose output (or input, ``use_input``) is read.
        kind: ``"stem"``, ``"block"`` (a residual block) or ``"point"`` (anything else).
        stage: stage index (``None`` when unknown).
        is_transition: the block changes shape (its shortcut is a projection).
        branch: the module whose output is the residual branch (``None`` if unknown).
        use_input: read the module's input instead of its output.
    """

    name: str
    module: nn.Module
    kind: str
    stage: int | None = None
    is_transition: bool = False
    branch: nn.Module | None = None
    use_input: bool = False


def _stage_indices(blocks: Sequence[tuple[str, nn.Module]]) -> list[int]:
    """Stage of each block: its ``stage_index`` for normfree blocks, else the order of first
    appearance of the block's parent name (``layer1.0`` and ``layer1.1`` share stage 0)."""
    parents: dict[str, int] = {}
    stages = []
    for name, module in blocks:
        if isinstance(module, ResidualBlock):
            stages.append(int(module.stage_index))
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        stages.append(parents.setdefault(parent, len(parents)))
    return stages


def _block_specs(blocks: Sequence[tuple[str, nn.Module]]) -> list[PointSpec]:
    specs = []
    for (name, module), stage in zip(blocks, _stage_indices(blocks)):
        branch = module.branch_probe if isinstance(module, ResidualBlock) else None
        specs.append(
            PointSpec(name, module, "block", stage, _has_projection(module), branch=branch)
        )
    return specs


def default_points(model: nn.Module) -> list[PointSpec]:
    """The points of a Signal Propagation Plot: the stem output and every residual block output.

    Order of preference: a model attribute ``analysis_points`` (a list of module-name globs) →
    :class:`normfree.nn.ResidualBlock` instances → :func:`find_residual_blocks`. The stem point
    is the ``stem`` submodule when there is one, else the input of the first residual block.
    """
    declared = getattr(model, "analysis_points", None)
    if declared is not None:
        return points_from_patterns(model, list(declared))
    blocks = [(n, m) for n, m in model.named_modules() if n and isinstance(m, ResidualBlock)]
    if not blocks:
        blocks = find_residual_blocks(model)
    if not blocks:
        raise ValueError(
            f"could not find residual blocks in {type(model).__name__}; pass points=[...] "
            "(--points on the command line): module names or globs such as 'layer?.*' or "
            "'features.**.relu'"
        )
    specs = _block_specs(blocks)
    stem = model._modules.get("stem")
    if isinstance(stem, nn.Module):
        head = PointSpec("stem", stem, "stem", specs[0].stage)
    else:
        first_name, first = blocks[0]
        head = PointSpec(f"{first_name}:input", first, "stem", specs[0].stage, use_input=True)
    return [head, *specs]


def points_from_patterns(model: nn.Module, patterns: str | Iterable[str]) -> list[PointSpec]:
    """Points for user-named modules. Residual blocks among them keep their stage and branch;
    other modules get ``kind="point"`` and no stage."""
    chosen = resolve_modules(model, patterns)
    blocks = [(n, m) for n, m in chosen if _looks_residual(m)]
    block_specs = {s.name: s for s in _block_specs(blocks)}
    return [block_specs.get(n) or PointSpec(n, m, "point") for n, m in chosen]
