"""The package is layered and imports point one way (docs/architecture.md):
building blocks ← models ← training / analysis ← CLI. This test parses every module (lazy
imports inside functions included) and fails on an import against that direction."""

from __future__ import annotations

import ast
from pathlib import Path

import normfree

ROOT = Path(normfree.__file__).parent

# what each subpackage / top-level module may import from normfree (besides itself)
ALLOWED: dict[str, set[str]] = {
    "_version": set(),
    "atomic": set(),
    "console": set(),
    "nn": set(),
    "data": set(),
    "models": {"nn"},
    "optim": {"console", "nn"},
    "checkpoints": {"atomic", "console", "nn", "models"},
    "analysis": {"atomic", "nn", "models"},
    # train may build a converted model (``model=converted:PATH``, train/builders.py) and
    # words errors as the commands do (console: yaml_problem, first_line); console, like
    # atomic, imports nothing of normfree
    "train": {"atomic", "console", "nn", "models", "optim", "checkpoints", "data", "convert"},
    "deploy": {"atomic", "console", "nn", "models"},
    "convert": {"atomic", "console", "nn", "models", "optim", "checkpoints", "data"},
    "integrations": {"atomic", "nn", "models", "checkpoints"},
    "experiments": {"atomic", "nn", "models", "optim", "data", "analysis", "train", "convert"},
    "__init__": {"_version", "checkpoints", "convert", "models"},
}
CLI_MODULES = {"cli", "__main__"}  # normfree/cli.py, __main__.py and every <pkg>/cli.py: the top


def _layer_of(module: Path) -> tuple[str, bool]:
    rel = module.relative_to(ROOT)
    layer = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    return layer, rel.stem in CLI_MODULES


def _normfree_imports(module: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every absolute or relative import of normfree code."""
    rel = module.relative_to(ROOT).with_suffix("")
    package = ["normfree", *rel.parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(module.read_text(), str(module))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name.split(".")[0] == "normfree"]


def test_every_layer_is_known() -> None:
    layers = {_layer_of(p)[0] for p in ROOT.rglob("*.py")}
    assert layers <= set(ALLOWED) | CLI_MODULES, f"add {layers - set(ALLOWED)} to ALLOWED"


def test_imports_point_one_way() -> None:
    bad = []
    for module in sorted(ROOT.rglob("*.py")):
        layer, is_cli = _layer_of(module)
        for line, name in _normfree_imports(module):
            parts = name.split(".")
            target = parts[1] if len(parts) > 1 else "__init__"
            if target == layer or is_cli:
                continue
            if parts[-1] in CLI_MODULES or target not in ALLOWED[layer]:
                bad.append(f"{module.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


# inside models/: a family file reads its layers from nn/ and may use only the model contract
# (base), the registry and the shared ResNet layouts; never another family file
MODEL_SHARED = {"base", "registry", "layouts"}


def test_model_families_do_not_import_each_other() -> None:
    bad = []
    for module in sorted((ROOT / "models").glob("*.py")):
        if module.stem in MODEL_SHARED | {"__init__"} | CLI_MODULES:
            continue
        for line, name in _normfree_imports(module):
            parts = name.split(".")
            if len(parts) > 1 and parts[1] == "models":
                if len(parts) < 3 or parts[2] not in MODEL_SHARED:
                    bad.append(f"models/{module.name}:{line} imports {name}")
    assert not bad, "a model file imports another model file:\n" + "\n".join(bad)
