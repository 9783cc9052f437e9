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


def test_models_params_counts_without_allocating_the_weights(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--params`` prints the published counts (NF-ResNet-50 25.56M, Brock et al. 2021a;
    NFNet-F7 499.50M, official code) from models built on the meta device: building the
    largest ones for real allocated and initialised gigabytes (NFNet-F7+: 3.3 GB) each."""
    import normfree.models as models

    built = []
    real_create = models.create_model

    def spy(*args, **kwargs):
        model = real_create(*args, **kwargs)
        built.append({p.device.type for p in model.parameters()})
        return model

    monkeypatch.setattr(models, "create_model", spy)
    assert main(["models", "--params", "nf_resnet50"]) == 0
    assert main(["models", "--params", "nfnet_f7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["nf_resnet50", "25.56M"], ["nfnet_f7", "499.50M"],
    ]  # fmt: skip
    assert built == [{"meta"}, {"meta"}]


def test_models_output_cut_short_by_the_reader_is_not_a_traceback() -> None:
    """``normfree models --params 'nf_resnet*' | head -1``: the reader closes the pipe after
    the first line; the command used to die with a ``BrokenPipeError`` traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "normfree", "models", "--params", "nf_resnet*"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert first.split()[:2] == [b"nf_resnet101", b"44.55M"]
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_models_takes_several_patterns_and_excludes(capsys: pytest.CaptureFixture[str]) -> None:
    """``normfree models nf_resnet50 'nfnet_f[01]' --exclude '*f1'`` lists the names matching any
    pattern minus the excluded ones (a second pattern was "unrecognized arguments")."""
    assert main(["models", "nf_resnet50", "nfnet_f[01]", "--exclude", "*f1"]) == 0
    assert capsys.readouterr().out.split() == ["nf_resnet50", "nfnet_f0"]
    assert main(["models", "nfnet_f0*", "--exclude", "*_plus", "--exclude", "nf_*"]) == 0
    assert capsys.readouterr().out.split() == ["nfnet_f0"]
    assert main(["models", "nfnet*", "--exclude", "nfnet*"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("error: no model matches 'nfnet*' without 'nfnet*'")
