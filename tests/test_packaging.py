"""pyproject's extras: ``all`` holds every optional feature, each extra stands alone with ranges
(no pins), and README's list of extras matches pyproject."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
FEATURES = sorted(set(EXTRAS) - {"all", "dev"})


def _self_refs(requirements: list[str]) -> set[str]:
    refs: set[str] = set()
    for req in requirements:
        m = re.fullmatch(r"normfree\[([\w,\s-]+)\]", req)
        if m:
            refs |= {name.strip() for name in m.group(1).split(",")}
    return refs


def test_all_holds_every_optional_feature_and_dev_holds_all() -> None:
    assert _self_refs(EXTRAS["all"]) == set(FEATURES)
    assert "all" in _self_refs(EXTRAS["dev"])
    assert {"export", "timm"} <= set(FEATURES)


def test_each_feature_extra_stands_alone_with_ranges() -> None:
    for name in FEATURES:
        reqs = EXTRAS[name]
        assert reqs and not _self_refs(reqs), name  # installable alone: no reference to others
        for req in reqs:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+>=[\d.]+", req), (name, req)  # a range, no pin


def test_readme_lists_exactly_the_extras() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("alone gives the core library") :]
    section = section[: section.index("\n\n")]
    listed = set(re.findall(r"`([a-z]+)`(?: \(|,| \()", section))
    assert listed == set(EXTRAS), (listed, set(EXTRAS))
