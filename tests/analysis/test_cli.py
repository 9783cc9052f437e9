"""``normfree spp`` and ``normfree diagnose``."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

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


def test_a_bad_plot_format_fails_before_any_output_is_replaced(tmp_path, capsys) -> None:
    """``--out plot.foo`` was refused by matplotlib only after --json/--csv had replaced the
    files already there."""
    pytest.importorskip("matplotlib")
    js, cs = tmp_path / "spp.json", tmp_path / "spp.csv"
    js.write_text("previous json")
    cs.write_text("previous csv")
    rc = main(["spp", "nf_resnet_cifar20", "--image-size", "8", "--batch", "2", "--json", str(js),
               "--csv", str(cs), "--out", str(tmp_path / "plot.foo")])  # fmt: skip
    assert rc == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: cannot draw a figure as {tmp_path / 'plot.foo'}: "
                                   "matplotlib does not write '.foo' files; use .png")  # fmt: skip
    assert js.read_text() == "previous json" and cs.read_text() == "previous csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spp.csv", "spp.json"]


def test_two_outputs_naming_one_file_are_refused(tmp_path, capsys, monkeypatch) -> None:
    """``--json r.out --csv ./r.out`` wrote the JSON, then replaced it with the CSV."""
    monkeypatch.chdir(tmp_path)
    rc = main(["spp", "nf_resnet_cifar20", "--image-size", "8", "--json", "r.out", "--csv",
               "./r.out"])  # fmt: skip
    assert rc == 2
    assert capsys.readouterr().err == (
        "error: --json and --csv both name ./r.out; give each its own file\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_spp_of_a_model_that_gives_nan_exits_1_with_one_line(
    tmp_path, capsys, monkeypatch
) -> None:
    """A NaN-producing model exited 0 with NaN tables and nothing on stderr."""
    (tmp_path / "nan_models.py").write_text(
        "import torch, normfree\n"
        "def first_block_nan():\n"
        "    model = normfree.create_model('nf_resnet_cifar20')\n"
        "    with torch.no_grad():\n"
        "        model.stages[0][0].conv2.bias.fill_(float('nan'))  # NaN from the first block\n"
        "    return model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    js = tmp_path / "nan.json"
    rc = main(["spp", "nan_models:first_block_nan", "--image-size", "8", "--batch", "2",
               "--skip-gains-one", "--quiet", "--json", str(js)])  # fmt: skip
    assert rc == 1
    assert capsys.readouterr().err == (
        "error: nan_models:first_block_nan gives NaN or inf at 9 of 10 points, from "
        "stages.0.0 on; check its initialisation and overrides (normfree diagnose)\n"
    )
    assert json.loads(js.read_text())[0]["config"]["non_finite_points"][0] == "stages.0.0"
    assert main(["spp", "nf_resnet_cifar20", "--image-size", "8", "--batch", "2",
                 "--skip-gains-one", "--quiet"]) == 0  # fmt: skip


@pytest.mark.parametrize("command", ["spp", "diagnose"])
def test_an_output_naming_the_model_file_is_refused(tmp_path, capsys, command: str) -> None:
    """``normfree spp model.safetensors --json model.safetensors`` replaced the converted model
    with the results."""
    import torch

    from normfree.convert import convert_model, save_converted
    from normfree.convert.experiment import bn_resnet_small

    kwargs = {"num_classes": 10, "in_chans": 1, "width": 4}
    torch.manual_seed(0)
    converted = convert_model(bn_resnet_small(**kwargs).eval(), "bn_free",
                              source="normfree.convert.experiment:bn_resnet_small",
                              source_kwargs=kwargs)  # fmt: skip
    model_file = tmp_path / "model.safetensors"
    save_converted(converted, model_file)
    saved = model_file.read_bytes()
    assert main([command, str(model_file), "--image-size", "8", "--json", str(model_file)]) == 2
    assert capsys.readouterr().err == (
        f"error: --json {model_file} would overwrite the model file {model_file}; write elsewhere\n"
    )
    assert model_file.read_bytes() == saved


def test_a_model_without_residual_blocks_names_the_points_option(capsys) -> None:
    """The error told a command-line user to pass ``points=[...]``, a Python argument."""
    assert main(["spp", "torch.nn:Identity", "--image-size", "8"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: could not find residual blocks in Identity; pass points=[...] "
                   "(--points on the command line): module names or globs such as 'layer?.*' "
                   "or 'features.**.relu'\n")  # fmt: skip
    assert main(["spp", "torch.nn:Identity", "--image-size", "8", "--points", "**"]) == 2
    assert "matches no module" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["spp", "diagnose"])
def test_a_seed_torch_cannot_take_is_refused_by_the_parser(capsys, command: str) -> None:
    """``--seed 99999999999999999999999`` ended in torch's "Overflow when unpacking long long"."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "nf_resnet_cifar20", "--image-size", "8", "--seed", str(2**64)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --seed: {2**64} is out of range; use a seed from 0 to {2**63 - 2}" in err
    assert "Overflow" not in err and "Traceback" not in err


def _pooled_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(4))


class _FixedSizeNet(nn.Module):
    """Asserts its input size, as torchvision's ViT does (``torch._assert``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[-1] == 16, f"Expected 16 but got {x.shape[-1]}!")
        return self.conv(x)


@pytest.mark.parametrize("command", ["spp", "diagnose"])
def test_a_model_that_cannot_take_the_input_size_is_one_line(monkeypatch, capsys,
                                                             command: str) -> None:  # fmt: skip
    """A model whose forward raises on the batch (a pool left with no pixels, a ViT's fixed
    size) ended in a traceback."""
    import types

    fake = types.ModuleType("qa_fake_models")
    fake.pooled = _pooled_net  # type: ignore[attr-defined]
    fake.fixed = _FixedSizeNet  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qa_fake_models", fake)
    batch = "16" if command == "spp" else "8"
    assert main([command, "qa_fake_models:pooled", "--image-size", "2", "--points", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: qa_fake_models:pooled fails on a batch of shape ({batch}, 3, 2, 2): "
    )
    assert "--image-size (and --batch) that it accepts" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main([command, "qa_fake_models:fixed", "--image-size", "8", "--points", "conv"]) == 2
    assert capsys.readouterr().err == (
        f"error: qa_fake_models:fixed fails on a batch of shape ({batch}, 3, 8, 8): Expected 16 "
        "but got 8!; pass an --image-size (and --batch) that it accepts\n"
    )
    assert main([command, "qa_fake_models:fixed", "--image-size", "16", "--points", "conv"]) == 0
    capsys.readouterr()
    # BatchNorm's ValueError on one value per channel (--batch 1 down to 1x1 pixels)
    fake.pooled_bn = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1),  # type: ignore[attr-defined]
                                           nn.BatchNorm2d(4))  # fmt: skip
    argv = [command, "qa_fake_models:pooled_bn", "--image-size", "8", "--batch", "1"]
    assert main([*argv, "--points", "1"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: qa_fake_models:pooled_bn fails on a batch of shape (1, 3, 8, 8): Expected more "
        "than 1 value per channel when training"
    )

    # a RuntimeError of the analysis code itself is still a bug with its traceback
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("analysis bug")

    monkeypatch.setattr(sys.modules["normfree.analysis.spp"], "channel_stats", broken)
    with pytest.raises(RuntimeError, match="analysis bug"):
        main([command, "qa_fake_models:fixed", "--image-size", "16", "--points", "conv"])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["spp", "nf_resnet_cifar20", "--image-size", "10000000000", "--batch", "64"],
         "too large to allocate"),
        (["diagnose", "nf_resnet_cifar20", "--image-size", "3037000500"], "too large to allocate"),
        (["spp", "nf_resnet_cifar20[alpha=1.0e+200]", "--image-size", "8"], "α² overflows"),
        (["spp", "{empty}", "--image-size", "8"], "corrupt safetensors file"),
        (["diagnose", "{empty}", "--image-size", "8"], "corrupt safetensors file"),
    ],
    ids=["spp-size", "diagnose-size", "alpha", "spp-safetensors", "diagnose-safetensors"],
)  # fmt: skip
def test_inputs_that_ended_in_a_traceback_are_one_line(tmp_path, capsys, argv, needle) -> None:
    """A size whose byte count overflows int64 (PyTorch: "Storage size calculation
    overflowed"), an α whose square overflows, an empty .safetensors model file."""
    (tmp_path / "e.safetensors").write_bytes(b"")
    argv = [a.replace("{empty}", str(tmp_path / "e.safetensors")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and needle in err.splitlines()[-1]
