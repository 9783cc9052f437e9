"""Checkpoint interop: normfree files, timm and DeepMind layouts, errors, atomic writes."""

from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import normfree
from normfree.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    atomic_save,
    load_pretrained,
    normfree_to_deepmind,
    normfree_to_timm,
    save_model,
)

TSV = Path(__file__).resolve().parents[1] / "models" / "data" / "dm_nfnet_f0_params.tsv"


def _small_nfnet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = normfree.create_model("nfnet_f0", num_classes=10, depths=(1, 1, 2, 1))
    with torch.no_grad():  # non-trivial gains so a wrong mapping shows in the logits
        for name, p in model.named_parameters():
            if name.endswith(("gain", "bias")):
                p.uniform_(0.5, 1.5) if name.endswith("gain") else p.normal_(0, 0.1)
    return model.eval()


def _logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_normfree_model_file_round_trip(tmp_path: Path, suffix: str) -> None:
    src, dst = _small_nfnet(0), _small_nfnet(1)
    path = tmp_path / f"model{suffix}"
    save_model(src, path)
    report = load_pretrained(dst, path)
    assert not report.missing and not report.unexpected and not report.mismatched
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=0)


def test_timm_state_dict_round_trip(tmp_path: Path) -> None:
    src, dst = _small_nfnet(0), _small_nfnet(1)
    timm_sd = normfree_to_timm(src.state_dict())
    # timm's key names (create_model('dm_nfnet_f0').state_dict() in timm/models/nfnet.py)
    assert "stages.0.0.skipinit_gain" in timm_sd and timm_sd["stages.0.0.skipinit_gain"].shape == ()
    assert timm_sd["stem.conv1.gain"].shape == (16, 1, 1, 1)
    assert "final_conv.weight" in timm_sd and "head.fc.weight" in timm_sd
    assert "stages.0.0.attn_last.fc1.weight" in timm_sd
    torch.save(timm_sd, tmp_path / "timm.pth")
    load_pretrained(dst, tmp_path / "timm.pth")
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=0)


def test_a_timm_training_checkpoint_gives_its_raw_or_its_ema_weights(tmp_path: Path) -> None:
    """timm's train.py writes {"state_dict", "state_dict_ema", "optimizer", "args", ...}:
    use_ema=True used to say the file has no EMA weights."""
    raw, ema, dst = _small_nfnet(0), _small_nfnet(1), _small_nfnet(2)
    checkpoint = {"epoch": 3, "arch": "dm_nfnet_f0", "version": 2,
                  "state_dict": normfree_to_timm(raw.state_dict()),
                  "state_dict_ema": normfree_to_timm(ema.state_dict())}  # fmt: skip
    torch.save(checkpoint, tmp_path / "checkpoint-3.pth.tar")
    load_pretrained(dst, tmp_path / "checkpoint-3.pth.tar", use_ema=True)
    torch.testing.assert_close(_logits(dst), _logits(ema), rtol=0, atol=0)
    load_pretrained(dst, tmp_path / "checkpoint-3.pth.tar")
    torch.testing.assert_close(_logits(dst), _logits(raw), rtol=0, atol=0)


def _write_haiku_pickle(tree: dict, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(tree, f, protocol=4)


def test_deepmind_file_round_trip_needs_opt_in(tmp_path: Path) -> None:
    src, dst = _small_nfnet(0), _small_nfnet(1)
    tree = normfree_to_deepmind(src)
    assert tree["NFNet/~/stem_conv0"]["w"].shape == (3, 3, 3, 16)  # HWIO
    assert tree["NFNet/~/linear"]["w"].shape == (3072, 10)  # (in, out)
    path = tmp_path / "F0_haiku.npz"
    _write_haiku_pickle(tree, path)
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_pretrained(dst, path)
    load_pretrained(dst, path, trust_pickle=True)
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=0)


def test_deepmind_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:
        pickle.dump({"NFNet/~/linear": {"w": Evil()}}, f)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle builtins\.print"):
        load_pretrained(_small_nfnet(0), path, trust_pickle=True)


def test_official_f0_names_and_shapes_match_reference_table() -> None:
    """Every parameter of the official F0 (dm-nfnet-f0-params.tsv) maps 1:1 onto nfnet_f0."""
    if not TSV.is_file():
        pytest.skip("shared/reference not present")
    with torch.device("meta"):
        model = normfree.create_model("nfnet_f0")
    tree = {}
    for line in TSV.read_text().splitlines():
        module, param, shape = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        tree.setdefault(module, {})[param] = np.broadcast_to(np.float32(0), shape)
    from normfree.checkpoints import deepmind_to_normfree

    converted = deepmind_to_normfree(tree, model)
    own = model.state_dict()
    assert set(converted) == set(own)
    assert all(tuple(converted[k].shape) == tuple(own[k].shape) for k in own)
    assert sum(v.numel() for v in converted.values()) == 71_489_284


def test_mismatch_lists_everything_and_loads_nothing(tmp_path: Path) -> None:
    src = normfree.create_model("nf_resnet_cifar20", num_classes=10)
    dst = normfree.create_model("nf_resnet_cifar20", num_classes=5)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = src.state_dict()
    sd.pop("stem.conv.gain")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(dst, tmp_path / "m.pt")
    msg = str(info.value)
    assert "stem.conv.gain" in msg and "extra.weight" in msg and "head.fc.weight" in msg
    assert "[5, 64]" in msg and "[10, 64]" in msg
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was changed by a failed strict load"
    report = load_pretrained(dst, tmp_path / "m.pt", strict=False)
    assert "stem.conv.weight" in report.loaded and "head.fc.weight" not in report.loaded
    assert torch.equal(dst.state_dict()["stem.conv.weight"], src.state_dict()["stem.conv.weight"])


def test_corrupt_and_missing_files_are_errors(tmp_path: Path) -> None:
    model = normfree.create_model("nf_resnet_cifar20")
    save_model(model, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "bad.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_pretrained(model, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(model, tmp_path / "nope.pt")


def test_torch_file_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    import argparse

    torch.save({"state_dict": argparse.Namespace(a=1)}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match=r"it names argparse\.Namespace"):
        load_pretrained(normfree.create_model("nf_resnet_cifar20"), tmp_path / "obj.pt")


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    atomic_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


@pytest.mark.parametrize(
    "module",
    ["numpy_pwn", "numpy.f2py.__main__"],
    ids=["module-from-cwd", "numpy-submodule"],
)
def test_deepmind_allow_list_is_exact_and_checked_before_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    """A crafted ``F1_haiku.npz`` naming a module that merely *starts with* ``numpy`` is refused
    before the module is imported: a ``numpy_pwn.py`` in the working directory never runs, and
    ``numpy.f2py.__main__`` (which runs f2py on import) is never imported."""
    marker = tmp_path / "pwned"
    (tmp_path / "numpy_pwn.py").write_text(
        f"open({str(marker)!r}, 'w').write('code ran')\nclass EvilDtype:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, module, raising=False)
    path = tmp_path / "F1_haiku.npz"
    # GLOBAL '<module> EvilDtype', EMPTY_TUPLE, REDUCE, STOP
    path.write_bytes(b"c" + module.encode() + b"\nEvilDtype\n)R.")
    with pytest.raises(CheckpointError, match=rf"refusing to unpickle {re.escape(module)}\."):
        load_pretrained(_small_nfnet(0), path, trust_pickle=True)
    assert module not in sys.modules
    assert not marker.exists()


def test_a_bad_format_or_a_model_that_is_no_nfnet_is_named() -> None:
    from normfree.checkpoints import normfree_to_deepmind

    model = normfree.create_model("nf_resnet_cifar20")
    with pytest.raises(ValueError, match="format must be one of auto, normfree, timm"):
        load_pretrained(model, "never_read.pt", format="bogus")
    with pytest.raises(CheckpointError, match=r"onto normfree's NFNet models .* not a NFResNet"):
        normfree_to_deepmind(model)


def test_create_model_reads_a_deepmind_pickle_when_the_cfg_trusts_it(tmp_path: Path) -> None:
    """``create_model(pretrained=True)`` loads what ``load_pretrained`` loads (README): the
    official pickled files with ``pretrained_cfg_overlay=dict(file=PATH, trust_pickle=True)``,
    and without it the error names that way."""
    src = _small_nfnet(0)
    path = tmp_path / "F0_haiku.npz"
    _write_haiku_pickle(normfree_to_deepmind(src), path)
    cfg = dict(file=path, num_classes=10)  # the file's class count
    with pytest.raises(CheckpointError, match=r"dict\(file=PATH, trust_pickle=True\)"):
        normfree.create_model("nfnet_f0", pretrained=True, pretrained_cfg_overlay=cfg,
                              depths=(1, 1, 2, 1))  # fmt: skip
    model = normfree.create_model("nfnet_f0", pretrained=True, depths=(1, 1, 2, 1),
                                  pretrained_cfg_overlay={**cfg, "trust_pickle": True})
    torch.testing.assert_close(_logits(model.eval()), _logits(src), rtol=0, atol=0)


def test_corrupt_or_malformed_haiku_files_raise_checkpoint_errors(tmp_path: Path) -> None:
    """Damaged or malformed weight files fail with a one-line CheckpointError naming the file,
    never a raw TypeError / MemoryError / ValueError from deep inside the reader."""
    path = tmp_path / "F0_haiku.npz"
    model = _small_nfnet(0)
    data = pickle.dumps(normfree_to_deepmind(model), protocol=4)
    bad_pickles = [
        data[:2] + b"\x95" + b"\xff" * 8,  # a frame length no machine can allocate
        b"\x80\x04" + b"\x8e" + b"\xff" * 8,  # BINBYTES8 larger than sys.maxsize
        b"\x80\x04]\x94(K\x01K\x02e\x85R.",  # calls a list: TypeError inside the unpickler
    ]  # fmt: skip
    malformed = [
        ({"NFNet/~/linear": [1, 2]}, r"module 'NFNet/~/linear' holds a list"),
        ({"NFNet/~/linear": None}, "holds a NoneType"),
        ({"NFNet/~/linear": {"w": "abc"}}, r"NFNet/~/linear/w is not a numeric array"),
    ]
    for raw in bad_pickles:
        path.write_bytes(raw)
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            load_pretrained(model, path, trust_pickle=True)
    for tree, message in malformed:
        _write_haiku_pickle(tree, path)
        with pytest.raises(CheckpointError, match=message):
            load_pretrained(model, path, trust_pickle=True)
    flat = tmp_path / "flat.npz"  # a real .npz archive holding an object array
    np.savez(flat, **{"NFNet/~/linear/w": np.array([object(), 1], dtype=object)})
    with pytest.raises(CheckpointError, match=r"cannot read \.npz archive .*allow_pickle"):
        load_pretrained(model, flat)
    flat.write_bytes(flat.read_bytes()[:40] + b"\0" * 16 + flat.read_bytes()[40:])
    with pytest.raises(CheckpointError, match=r"cannot read \.npz archive"):
        load_pretrained(model, flat)


def test_pretrained_rgb_weights_adapt_to_other_input_channels_by_timms_rule(
    tmp_path: Path,
) -> None:
    """``pretrained=True, in_chans=1`` was a shape-mismatch error; timm sums the RGB filters of
    the first conv (one channel) or repeats them scaled by 3/in_chans."""
    from normfree.checkpoints import adapt_input_conv

    src = normfree.create_model("nf_resnet_cifar20", num_classes=10)
    path = tmp_path / "rgb.safetensors"
    save_model(src, path)
    rgb = src.stem.conv.weight.detach()
    for in_chans, expected in ((1, rgb.sum(1, keepdim=True)),
                               (4, torch.cat([rgb, rgb[:, :1]], 1) * 0.75)):  # fmt: skip
        model = normfree.create_model("nf_resnet_cifar20", pretrained=True, in_chans=in_chans,
                                      pretrained_cfg_overlay={"file": str(path)})  # fmt: skip
        assert torch.equal(model.stem.conv.weight, expected)
        assert torch.equal(adapt_input_conv(rgb, in_chans), expected)
        mine = dict(model.state_dict())
        for name, value in src.state_dict().items():
            if name != "stem.conv.weight":
                assert torch.equal(mine[name], value), name
    with pytest.raises(ValueError, match="3 input channels"):
        adapt_input_conv(torch.zeros(4, 2, 3, 3), 1)
