"""Weight files in the forms other tools write them: dill's Haiku pickles, pickle protocols 4
and 5, wrapped models' keys (DDP, ``torch.compile``), state dicts in memory, and the damaged or
misnamed files a user may hand over, each loaded exactly or refused in one line naming why."""

from __future__ import annotations

import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import normfree
from normfree.checkpoints import (
    CheckpointError,
    load_pretrained,
    normfree_to_deepmind,
    normfree_to_timm,
    save_model,
)
from normfree.checkpoints.io import load_torch_file


def _small_nfnet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return normfree.create_model("nfnet_f0", num_classes=10, depths=(1, 1, 1, 1)).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


def _dill_create_array(f, args, state, npdict=None):  # dill's own, as dill 0.3/0.4 define it
    array = f(*args)
    array.__setstate__(state)
    return array


class _DillStyle(pickle.Pickler):
    """Pickles numpy arrays as dill does: ``dill._dill._create_array(f, args, state, None)``."""

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:
            f, args, state = obj.__reduce__()
            return sys.modules["dill._dill"]._create_array, (f, args, state, None)
        return NotImplemented


@pytest.fixture
def fake_dill(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A ``dill._dill`` module holding ``_create_array``, so that pickle writes its name (dill
    itself is not installed here)."""
    module = types.ModuleType("dill._dill")
    _dill_create_array.__module__, _dill_create_array.__qualname__ = "dill._dill", "_create_array"
    module._create_array = _dill_create_array
    monkeypatch.setitem(sys.modules, "dill", types.ModuleType("dill"))
    monkeypatch.setitem(sys.modules, "dill._dill", module)
    return module


def test_a_haiku_file_written_by_dill_loads_exactly(tmp_path: Path, fake_dill) -> None:
    """DeepMind's files are ``dill.dump`` outputs, whose every array is rebuilt by
    ``dill._dill._create_array``: it used to be refused even with ``trust_pickle=True``."""
    src, dst = _small_nfnet(0), _small_nfnet(1)
    path = tmp_path / "F0_haiku.npz"
    with open(path, "wb") as f:
        _DillStyle(f, protocol=4).dump(normfree_to_deepmind(src))
    assert b"_create_array" in path.read_bytes()
    load_pretrained(dst, path, trust_pickle=True)
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=0)


def test_dill_s_array_builder_accepts_numpy_s_reconstructor_only(tmp_path: Path, fake_dill):
    """The stand-in for ``_create_array`` calls what the pickle gives it: anything but numpy's
    ``_reconstruct`` (here ``builtins.dict``, which the allow-list resolves) is refused."""
    path = tmp_path / "odd.npz"

    class Marker:
        pass

    class Odd(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, Marker):
                return fake_dill._create_array, (dict, (), {}, None)
            return NotImplemented

    with open(path, "wb") as f:
        Odd(f, protocol=4).dump({"NFNet/~/linear": {"w": Marker()}})
    assert b"_create_array" in path.read_bytes() and b"builtins" in path.read_bytes()
    with pytest.raises(CheckpointError, match="not numpy's _reconstruct"):
        load_pretrained(_small_nfnet(0), path, trust_pickle=True)


def test_a_haiku_pickle_at_protocol_5_loads(tmp_path: Path) -> None:
    src, dst = _small_nfnet(0), _small_nfnet(1)
    path = tmp_path / "F0_p5.npz"
    path.write_bytes(pickle.dumps(normfree_to_deepmind(src), protocol=5))
    assert b"_frombuffer" in path.read_bytes()
    load_pretrained(dst, path, trust_pickle=True)
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=0)


def test_a_truncated_npz_archive_is_corrupt_not_a_pickle(tmp_path: Path) -> None:
    """Half of a flat ``.npz``: it used to be taken for a pickle and the user told to opt in
    to unpickling it."""
    tree = normfree_to_deepmind(_small_nfnet(0))
    flat = {f"{m}/{p}": v for m, params in tree.items() for p, v in params.items()}
    path = tmp_path / "flat.npz"
    np.savez(path, **flat)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not zipfile.is_zipfile(path)
    for trust in (False, True):
        with pytest.raises(CheckpointError, match=r"corrupt or truncated \.npz") as info:
            load_pretrained(_small_nfnet(0), path, trust_pickle=trust)
        assert "trust_pickle" not in str(info.value)


def test_a_compiled_or_ddp_model_s_keys_are_the_model_s_own(tmp_path: Path) -> None:
    """``save_model(torch.compile(m))`` writes the model's keys (it wrote ``_orig_mod.…``,
    which no model loaded); a file saved from DDP (``module.…``) loads through
    ``checkpoint_path=`` as in timm; and a compiled model loads a plain file."""
    torch.manual_seed(0)
    model = normfree.create_model("nf_resnet_cifar20")
    compiled = torch.compile(model)
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"compiled{suffix}"
        save_model(compiled, path)
        target = normfree.create_model("nf_resnet_cifar20")
        load_pretrained(target, path)
        assert target.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in
                   zip(target.state_dict().values(), model.state_dict().values()))  # fmt: skip
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, ddp)
    built = normfree.create_model("nf_resnet_cifar20", checkpoint_path=ddp)
    assert torch.equal(built.stem.conv.weight, model.stem.conv.weight)
    other = torch.compile(normfree.create_model("nf_resnet_cifar20"))
    load_pretrained(other, ddp)
    assert torch.equal(other.stem.conv.weight, model.stem.conv.weight)


def test_a_state_dict_in_the_cfg_is_loaded_as_a_file_is(tmp_path: Path) -> None:
    """``pretrained_cfg_overlay=dict(state_dict=...)``: adapted to other input channels and read
    in timm's names, as ``file=`` (it was a bare ``load_state_dict``: a size mismatch, or 59
    lines of missing keys)."""
    torch.manual_seed(0)
    rgb = normfree.create_model("nf_resnet_cifar20").state_dict()
    gray = normfree.create_model("nf_resnet_cifar20", pretrained=True, in_chans=1,
                                 pretrained_cfg_overlay=dict(state_dict=rgb))  # fmt: skip
    torch.testing.assert_close(gray.stem.conv.weight, rgb["stem.conv.weight"].sum(1, True))
    src = _small_nfnet(2)
    timm_keys = normfree_to_timm(src.state_dict())
    dst = normfree.create_model("nfnet_f0", depths=(1, 1, 1, 1), pretrained=True,
                                pretrained_cfg_overlay=dict(state_dict=timm_keys, num_classes=10))
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=0)


def test_use_ema_on_a_file_without_one_is_an_error_in_every_format(tmp_path: Path) -> None:
    model = normfree.create_model("nf_resnet_cifar20")
    files = [tmp_path / "m.pt", tmp_path / "m.safetensors", tmp_path / "bare.pt"]
    save_model(model, files[0])
    save_model(model, files[1])
    torch.save(model.state_dict(), files[2])
    for path in files:
        with pytest.raises(CheckpointError, match="has no EMA weights"):
            load_pretrained(model, path, use_ema=True)


def test_torch_files_at_pickle_protocol_4_and_5_are_named_as_such(tmp_path: Path) -> None:
    """PyTorch's safe loader cannot read protocols 4 and 5 (their FRAME opcode): the file is
    valid, and the error says how to save it again (it said "corrupt or truncated")."""
    state = {"w": torch.ones(3)}
    for protocol in (4, 5):
        for zipped in (True, False):
            path = tmp_path / f"p{protocol}{zipped}.pt"
            torch.save(state, path, pickle_protocol=protocol,
                       _use_new_zipfile_serialization=zipped)  # fmt: skip
            with pytest.raises(CheckpointError, match=f"pickle protocol {protocol} ") as info:
                load_torch_file(path)
            assert "corrupt" not in str(info.value)
    path = tmp_path / "p2.pt"
    torch.save(state, path, pickle_protocol=2)
    assert torch.equal(load_torch_file(path)["w"], state["w"])


def test_raw_pickles_and_whole_legacy_models_are_named_for_what_they_are(tmp_path: Path):
    """``pickle.dump`` of a state dict is named as such (it named ``collections.OrderedDict``,
    which torch's loader allows); a whole model saved in the legacy format names its class (it
    was called corrupt)."""
    model = normfree.create_model("nf_resnet_cifar20")
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(model.state_dict()))
    with pytest.raises(CheckpointError, match=r"\(it is a pickle\.dump of tensors"):
        load_torch_file(raw)
    whole = tmp_path / "whole.pt"
    torch.save(model, whole, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"\(it names normfree\.models\.nf_resnet\.NFResNet"):
        load_torch_file(whole)


def test_a_flipped_byte_in_a_tensor_record_is_caught(tmp_path: Path) -> None:
    """PyTorch's reader does not check the zip records' CRC-32: a flipped byte in a tensor
    loaded as a wrong value."""
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    data[info.header_offset + 200] ^= 0xFF  # inside the record's data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"its record .*/data/0 does not match its checksum"):
        load_torch_file(path)


def test_a_folder_is_named_as_a_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"is a folder, not a weights file.*best\.pt"):
        load_pretrained(normfree.create_model("nf_resnet_cifar20"), tmp_path)


def test_wrapper_prefixes_stop_at_the_model_s_own_keys() -> None:
    """A container whose one child is named ``module`` keeps that prefix; a DDP copy of it
    loses only DDP's."""
    from normfree.nn import strip_wrapper_prefixes

    assert strip_wrapper_prefixes({"module.a": 1, "module.b": 2}) == {"a": 1, "b": 2}
    assert strip_wrapper_prefixes({"module._orig_mod.a": 1}) == {"a": 1}
    assert strip_wrapper_prefixes({"module.a": 1}, ["module.a"]) == {"module.a": 1}
    assert strip_wrapper_prefixes({"module.module.a": 1}, ["module.a"]) == {"module.a": 1}
    assert strip_wrapper_prefixes({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}
