"""A converted-model file names the architecture to rebuild; the file is untrusted input, so a
description naming an arbitrary ``package.module:factory`` (here ``builtins:open``, which would
create a file) or options that load another file is refused by every reader unless it opts in
with ``--trust-code`` / ``trust_code=True``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from normfree.checkpoints import CheckpointError
from normfree.checkpoints.io import atomic_save, save_safetensors
from normfree.cli import main
from normfree.convert import load_converted, save_converted, trusting_code
from normfree.convert.experiment import bn_resnet_small
from normfree.convert.sources import SHIPPED_FACTORIES

pytest.importorskip("sklearn")
SHIPPED = "normfree.convert.experiment:bn_resnet_small"


def _forged(tmp_path: Path, source: str, kwargs: dict, suffix: str) -> Path:
    """A real converted file (nf mode, 1 channel, 10 classes) whose description is rewritten."""
    from normfree.convert import convert_model

    assert SHIPPED in SHIPPED_FACTORIES
    torch.manual_seed(0)
    c = convert_model(bn_resnet_small(width=4), "nf", torch.randn(4, 1, 8, 8),
                      source=SHIPPED, source_kwargs={"width": 4})  # fmt: skip
    honest = tmp_path / "honest.safetensors"
    save_converted(c, honest)
    with safe_open(str(honest), "pt") as f:
        description = json.loads(f.metadata()["description"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    description.update(source=source, source_kwargs=kwargs)
    path = tmp_path / f"forged{suffix}"
    if suffix == ".safetensors":
        meta = {"format": "normfree.converted", "description": json.dumps(description)}
        save_safetensors(tensors, path, metadata=meta)
    else:
        atomic_save({"format": "normfree.converted", "description": description,
                     "state_dict": tensors}, path)  # fmt: skip
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_file_naming_a_callable_runs_nothing_without_the_opt_in(tmp_path, suffix) -> None:
    marker = tmp_path / "code_ran"
    path = _forged(tmp_path, "builtins:open", {"file": str(marker), "mode": "w"}, suffix)
    with pytest.raises(CheckpointError, match=r"names the architecture 'builtins:open'"):
        load_converted(path)
    assert not marker.exists()
    with pytest.raises(Exception, match=r"not an nn\.Module"), trusting_code():
        load_converted(path)  # the opt-in is what lets it run: the payload is real
    assert marker.exists()


def test_options_that_load_another_file_are_refused(tmp_path) -> None:
    path = _forged(tmp_path, "normfree:nf_resnet_cifar20", {"checkpoint_path": "/x.pt"}, ".pt")
    with pytest.raises(CheckpointError, match=r"\['checkpoint_path'\].*would load another file"):
        load_converted(path)


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "{f}", "--data", "digits"],
        ["spp", "{f}", "--image-size", "8", "--quiet"],
        ["diagnose", "{f}", "--image-size", "8"],
        ["export", "{f}", "--out", "{d}/m.onnx"],
        ["train", "model=converted:{f}", "train.epochs=1", "train.max_steps_per_epoch=1",
         "log.progress=false", "--out", "{d}/run"],
    ],
    ids=["eval", "spp", "diagnose", "export", "train"],
)  # fmt: skip
def test_every_command_refuses_it_in_one_line(tmp_path, capsys, command) -> None:
    marker = tmp_path / "code_ran"
    path = _forged(tmp_path, "builtins:open", {"file": str(marker), "mode": "w"}, ".safetensors")
    capsys.readouterr()
    assert main([a.format(f=path, d=tmp_path) for a in command]) == 2
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    assert "'builtins:open'" in lines[-1] and "--trust-code" in lines[-1]
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("source", ["timm:hf-hub:someone/repo", "timm:local-dir:/tmp",
                                    "torchvision:../x", "normfree:nf_resnet_cifar20[width=2]"])
def test_registry_names_must_be_plain(tmp_path, source) -> None:
    """After ``timm:`` etc. comes a registered name, not a location timm would read or fetch."""
    path = _forged(tmp_path, source, {}, ".pt")
    with pytest.raises(CheckpointError, match=r"is not a plain .* model name"):
        load_converted(path)


def test_tensors_are_checked_against_the_description_before_a_real_build(
    tmp_path, monkeypatch
) -> None:
    """A small file whose description asks for a huge model is refused on the meta device:
    only meta-device builds happen."""
    import normfree.convert.api as api

    path = _forged(tmp_path, SHIPPED, {"width": 4, "num_classes": 10**7}, ".pt")
    devices: list[str] = []
    real = api.build_source

    def build(spec, kwargs=None):
        devices.append(str(torch.empty(0).device))
        return real(spec, kwargs)

    monkeypatch.setattr(api, "build_source", build)
    with pytest.raises(CheckpointError, match=r"do not fit the architecture .*2 differ"):
        load_converted(path)
    assert devices == ["meta"]


def test_a_model_file_name_is_a_name_not_a_spec(tmp_path, capsys) -> None:
    """``normfree convert`` of a ``normfree.model`` file takes its model_name as a registered
    name: options in it (``[checkpoint_path=...]``) would read another file."""
    import normfree
    from normfree.checkpoints import save_model

    path = tmp_path / "m.pt"
    save_model(normfree.create_model("bn_resnet_cifar20"), path)
    state = torch.load(path, weights_only=True)
    state["model_name"] = "bn_resnet_cifar20[checkpoint_path='/x.pt']"
    torch.save(state, path)
    assert main(["convert", str(path), "--to", "bn_free", "--out", str(tmp_path / "o.pt"),
                 "--image-size", "8"]) == 2  # fmt: skip
    assert "is not a model name" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("description", "state", "needle"),
    [
        ([1, 2], None, "is not a converted-model description"),
        ({"version": 1, "mode": "nf"}, None, "is not a converted-model description"),
        (None, [1, 2], "not a mapping of names to tensors"),
        (None, {"w": 3}, "not a mapping of names to tensors"),
    ],
    ids=["list", "missing-keys", "state-list", "state-int"],
)
def test_a_damaged_description_or_state_is_one_error(tmp_path, description, state, needle):
    path = _forged(tmp_path, SHIPPED, {"width": 4}, ".pt")
    stored = torch.load(path, weights_only=True)
    if description is not None:
        stored["description"] = description
    if state is not None:
        stored["state_dict"] = state
    torch.save(stored, path)
    with pytest.raises(CheckpointError, match=needle):
        load_converted(path)


def test_options_that_would_download_or_load_are_refused_when_set(tmp_path) -> None:
    path = _forged(tmp_path, "torchvision:resnet18", {"weights_backbone": "DEFAULT"}, ".pt")
    with pytest.raises(CheckpointError, match=r"\['weights_backbone'\]"):
        load_converted(path)
    from normfree.convert.sources import file_loading_options

    assert file_loading_options({"pretrained": False, "checkpoint_path": None, "width": 2}) == []


def test_a_model_file_in_safetensors_converts_as_the_torch_one(tmp_path, capsys) -> None:
    """``save_model``'s ``.safetensors`` records its model in the header: ``normfree convert``
    reads it as it reads the ``.pt`` (it refused the file as "neither a checkpoint nor a model
    file")."""
    import normfree
    from normfree.checkpoints import save_model

    torch.manual_seed(0)
    model = normfree.create_model("bn_resnet_cifar20")
    outs = []
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"m{suffix}"
        save_model(model, path)
        out = tmp_path / f"o{suffix}"
        argv = ["convert", str(path), "--to", "bn_free", "--out", str(out), "--image-size", "8",
                "--standalone-bn", "affine"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        outs.append(out)
    from normfree.convert import load_converted

    a, b = (load_converted(p) for p in outs)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
