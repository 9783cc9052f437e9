"""``normfree spp`` and ``normfree diagnose``."""

from __future__ import annotations

import json
import sys

import pytest

from normfree.analysis.cli import parse_model_spec, parse_overrides
from normfree.cli import main


def test_parse_overrides_and_model_specs() -> None:
    assert parse_overrides(["use_ws=False", "alpha=0.5", "activation=gelu", "d=[1, 2]"]) == {
        "use_ws": False,
        "alpha": 0.5,
        "activation": "gelu",
        "d": [1, 2],
    }
    assert parse_model_spec("nf_resnet_cifar20[use_ws=False,depths=[1, 1, 1]]") == (
        "nf_resnet_cifar20",
        {"use_ws": False, "depths": [1, 1, 1]},
    )
    assert parse_model_spec("torchvision.models:resnet18") == ("torchvision.models:resnet18", {})
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["use_ws"])


def test_spp_command_writes_plot_json_and_csv(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out, js, cs = tmp_path / "spp.png", tmp_path / "spp.json", tmp_path / "spp.csv"
    rc = main(["spp", "nf_resnet_cifar20", "nf_resnet_cifar20[use_ws=False]", "--image-size", "8",
               "--batch", "4", "--skip-gains-one", "--out", str(out), "--json", str(js),
               "--csv", str(cs)])  # fmt: skip
    assert rc == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(js.read_text())
    assert [d["label"] for d in data] == ["nf_resnet_cifar20", "nf_resnet_cifar20[use_ws=False]"]
    assert all(d["config"]["skip_gains_to_one"] for d in data)
    assert len(cs.read_text().splitlines()) == 1 + 2 * 10
    assert "avg_sq_mean" in capsys.readouterr().out


def test_spp_command_notes_zero_skip_gains(capsys) -> None:
    assert main(["spp", "nf_resnet_cifar20", "--image-size", "8", "--batch", "2", "--quiet"]) == 0
    assert "--skip-gains-one" in capsys.readouterr().err


def test_unwritable_outputs_fail_before_the_analysis(tmp_path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    target = blocker / "spp.json"  # a path below a regular file can never be created
    assert main(["spp", "nf_resnet_cifar20", "--image-size", "8", "--json", str(target)]) == 2
    captured = capsys.readouterr()
    assert f"cannot write {target}" in captured.err and captured.out == ""  # nothing ran
    assert main(["diagnose", "nf_resnet_cifar20", "--image-size", "8", "--json", str(target)]) == 2
    assert f"cannot write {target}" in capsys.readouterr().err

@pytest.mark.parametrize("command", ["spp", "diagnose"])
def test_a_device_this_machine_lacks_is_a_one_line_error(capsys, command: str) -> None:
    bad = "cuda" if not __import__("torch").cuda.is_available() else "cuda:99"
    cases = ((bad, f"--device='{bad}'"), ("gpu", "--device='gpu' is not a device normfree runs"))
    for device, expected in cases:
        assert main([command, "nf_resnet_cifar20", "--image-size", "8", "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1, err


def test_diagnose_exit_codes(capsys) -> None:
    assert main(["diagnose", "nf_resnet_cifar20", "--image-size", "8"]) == 0
    assert "no problems found" in capsys.readouterr().out
    assert main(["diagnose", "bn_resnet_cifar20", "--image-size", "8"]) == 1
    assert "batch dependence (train mode)" in capsys.readouterr().out
    assert main(["diagnose", "nf_resnet_cifar20", "--override", "nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_diagnose_any_module_by_factory_path(capsys) -> None:
    pytest.importorskip("torchvision")
    rc = main(["diagnose", "torchvision.models:resnet18", "--image-size", "16",
               "--branch-points", "layer?.*.bn2"])  # fmt: skip
    assert rc == 1  # BatchNorm in train mode
    assert "layer1.0.bn1" in capsys.readouterr().out


def test_files_and_names_are_told_apart(tmp_path, monkeypatch, capsys) -> None:
    """A file in the working folder does not hide a model of the same name; a path that does
    not exist says so; a converted file's recorded input size is bounded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nf_resnet_cifar20").write_text("not a model")
    assert main(["diagnose", "nf_resnet_cifar20", "--image-size", "8", "--no-batch-check"]) == 0
    capsys.readouterr()
    assert main(["spp", "runs/none/best.pt", "--image-size", "8"]) == 2
    assert "no file 'runs/none/best.pt'" in capsys.readouterr().err
    from normfree.analysis.cli import check_recorded_size

    assert check_recorded_size(224, "f") == 224
    for bad in (200_000, 0, "32", True):
        with pytest.raises(ValueError, match="pass --image-size"):
            check_recorded_size(bad, "f")


# PyTorch's CPU allocator refusing what --image-size 100000 asks for
_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
    "memory: you tried to allocate 320000000000 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize("command", ["spp", "diagnose"])
def test_an_input_too_large_to_allocate_is_one_line(monkeypatch, capsys, command: str) -> None:
    """``--image-size 100000`` ended in PyTorch's allocator traceback."""

    def too_big(*args: object, **kwargs: object) -> None:
        raise RuntimeError(_OOM)

    monkeypatch.setattr(sys.modules["normfree.analysis.spp"], "signal_propagation", too_big)
    monkeypatch.setattr(sys.modules["normfree.analysis.diagnose"], "diagnose", too_big)
    assert main([command, "nf_resnet_cifar20", "--image-size", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    err = err.splitlines()[-1]  # (spp's note on zero SkipInit gains comes first)
    assert err.startswith("error: out of memory (298.0 GiB asked for)") and "--image-size" in err


def test_a_folder_given_as_a_model_says_so(tmp_path, capsys, monkeypatch) -> None:
    """A directory where a model file is expected was reported as an unknown model name."""
    assert main(["spp", str(tmp_path), "--image-size", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path} is a folder: give a model file in it (a run folder's "
                   "best.pt or last.pt), or a model NAME")  # fmt: skip
    (tmp_path / "r3").mkdir()  # a bare folder name is a model name first, then a hint
    monkeypatch.chdir(tmp_path)
    assert main(["spp", "r3", "--image-size", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'r3'") and err.count("\n") == 0
    assert "'r3' is a folder here: give a model file in it (r3/best.pt or r3/last.pt" in err
