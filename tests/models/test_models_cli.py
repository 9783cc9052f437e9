"""``normfree models``: the listing, a pattern, and a pattern that matches nothing."""

from __future__ import annotations

import pytest

from normfree.cli import main
from normfree.models import list_models


def test_models_lists_matches_and_says_when_nothing_matches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["models", "nfnet_f*"]) == 0
    out = capsys.readouterr().out.split()
    assert out == list_models("nfnet_f*") and "nfnet_f0" in out and len(out) == 16  # F0-F7, +
    assert main(["models", "NFNET*"]) == 1  # case-sensitive, as fnmatch on names
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: no model matches 'NFNET*'")
    assert len(captured.err.strip().splitlines()) == 1
