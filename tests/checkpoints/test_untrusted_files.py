"""Files that would run code when unpickled: every loader and every command that reads a file
refuses them in one line naming the file and what it holds, and no code runs."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch

from normfree.checkpoints import CheckpointError
from normfree.checkpoints.io import load_tensors, load_torch_file
from normfree.cli import main

QUIET = ["log.progress=false", "log.tensorboard=false", "log.plot=false", "train.threads=1"]


class _Marker:
    """Unpickling this calls ``open(path, "w")``: the marker file appears if code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A torch zip file and a raw protocol-4 pickle, each holding a ``_Marker``; the marker."""
    marker = tmp_path / "code_ran"
    zipped, raw = tmp_path / "evil.pt", tmp_path / "evil_raw.pt"
    torch.save({"w": torch.ones(2), "x": _Marker(marker)}, zipped)
    with open(raw, "wb") as f:
        pickle.dump({"x": _Marker(marker)}, f, protocol=4)
    return zipped, raw, marker


def test_the_loader_refuses_code_in_one_line_without_warnings(tmp_path: Path) -> None:
    zipped, raw, marker = _evil_files(tmp_path)
    for path in (zipped, raw):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's pickle-protocol warning is not shown
            with pytest.raises(CheckpointError) as info:
                load_torch_file(path)
        message = str(info.value)
        assert len(message.splitlines()) == 1
        assert str(path) in message and "can run code" in message and "weights_only" not in message
        assert "--trust-pickle" not in message  # no opt-in offered where there is none
    refused = r"\(it names (io|builtins)\.open\), and normfree does not unpickle"
    with pytest.raises(CheckpointError, match=refused):
        load_tensors(zipped)
    with pytest.raises(CheckpointError, match=r"or pass --trust-pickle if you trust"):
        load_tensors(zipped, trust_hint="--trust-pickle")
    assert not marker.exists()


def test_a_corrupt_file_is_not_called_unsafe(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1500])
    with pytest.raises(CheckpointError) as info:
        load_torch_file(truncated)
    message = str(info.value)
    assert "corrupt or truncated" in message and "restore it from a copy" in message
    assert len(message.splitlines()) == 1 and "can run code" not in message
    assert torch.equal(load_torch_file(good)["w"], torch.ones(1000))


def test_a_legacy_format_file_is_named_or_called_truncated(tmp_path: Path) -> None:
    """torch's pre-zip format: every pickle is read (inertly) before the file is called unsafe,
    so a file cut inside its pickle is truncated, not a file naming a clipped global; an unsafe
    one names the global that PyTorch refused."""
    import os

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(1000)}, good, _use_new_zipfile_serialization=False)
    torch.save({"w": torch.ones(2), "f": os.getcwd}, bad, _use_new_zipfile_serialization=False)
    data = good.read_bytes()
    assert torch.equal(load_torch_file(good)["w"], torch.ones(1000))
    with pytest.raises(CheckpointError, match=r"\(it names (posix|nt)\.getcwd\)"):
        load_torch_file(bad)
    for cut in (0, 30, 300, len(data) // 2, len(data) - 1):  # in every pickle and in the data
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            load_torch_file(tmp_path / "cut.pt")
        message = str(info.value)
        assert "corrupt or truncated" in message and "can run code" not in message, (cut, message)
        assert len(message.splitlines()) == 1 and ": )" not in message, message


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "{evil}"],
        ["export", "{evil}", "--out", "{out}/m.onnx"],
        ["export", "nf_resnet_cifar20", "--weights", "{evil}", "--out", "{out}/m.pt2"],
        ["convert", "{evil}", "--to", "nf", "--out", "{out}/c.safetensors", "--image-size", "8"],
        ["train", *QUIET, "train.epochs=1", "train.max_steps_per_epoch=1", "init_from={evil}",
         "--out", "{out}/run"],
        ["train", *QUIET, "distill.teacher=nf_resnet_cifar20", "distill.teacher_weights={evil}",
         "train.epochs=1", "train.max_steps_per_epoch=1", "--out", "{out}/run"],
    ],
    ids=["eval", "export", "export-weights", "convert", "train-init", "train-teacher"],
)  # fmt: skip
@pytest.mark.parametrize("kind", ["zip", "raw-pickle"])
def test_every_command_refuses_a_file_that_would_run_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], kind: str
) -> None:
    zipped, raw, marker = _evil_files(tmp_path)
    evil = zipped if kind == "zip" else raw
    out = tmp_path / "out"
    argv = [a.format(evil=evil, out=out) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()  # log lines of the run may come before the error
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error: ") for line in lines) == 1
    err = lines[-1]
    assert str(evil) in err and "can run code" in err
    offered = command[0] in ("convert", "eval", "export") and "--weights" not in command
    assert ("--trust-pickle" in err) == offered  # where a pickled converted model can be read
    assert not marker.exists()
    assert not (out / "m.onnx").exists() and not (out / "c.safetensors").exists()


def test_trust_pickle_only_retries_a_refused_pickle(tmp_path: Path, capsys) -> None:
    """``--trust-pickle`` unpickles a file the safe loader refused for holding objects; any
    other error (a corrupt file, weights that do not fit) is reported as it is, in one line."""
    empty, garbage = tmp_path / "empty.pt", tmp_path / "garbage.bin"
    empty.write_bytes(b"")
    garbage.write_bytes(bytes(range(256)) * 4)
    for path in (empty, garbage):
        assert main(["export", str(path), "--out", str(tmp_path / "m.onnx"), "--trust-pickle",
                     "--image-size", "8"]) == 2  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "corrupt or truncated" in err, err


def test_a_mismatch_names_the_file_in_its_one_line(tmp_path: Path, capsys) -> None:
    import normfree
    from normfree.checkpoints import save_model

    path = tmp_path / "four.safetensors"
    save_model(normfree.create_model("nf_resnet_cifar20", num_classes=4), path)
    assert main(["export", "nf_resnet_cifar20", "--weights", str(path),
                 "--out", str(tmp_path / "m.pt2")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{path} does not match the model" in err and "head.fc.bias" in err
    assert "strict=False" not in err and "(e.g. num_classes)" in err  # advice a command can take


def test_the_first_global_of_a_raw_pickle_is_named_exactly(tmp_path: Path) -> None:
    """Protocol 4 reuses memoised strings: the name comes from the unpickler's own lookup. The
    globals ``torch.save`` writes itself (``collections.OrderedDict``) are not what makes a file
    unsafe, so the first other one is named."""
    import collections
    import os

    path = tmp_path / "memo.pt"
    with open(path, "wb") as f:
        pickle.dump([{1, 2}, collections.OrderedDict, collections.Counter, os.getcwd], f, 4)
    with pytest.raises(CheckpointError, match=r"\(it names collections\.Counter\)"):
        load_torch_file(path)
