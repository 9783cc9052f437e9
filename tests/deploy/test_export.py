"""Inference folding and export: the folded / exported model computes what the eager eval-mode
model computes, the source model is untouched, and a failed export leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

import normfree
from normfree.cli import main
from normfree.deploy import ExportError, export_model, folded_module_counts, prepare_for_inference
from normfree.deploy import export as export_mod
from normfree.nn import ProxyNormActivation
from normfree.nn.ws import StdConv2dBase

FOLDABLE = ["nf_resnet_cifar20", "lnpn_resnet_cifar20", "wsgn_resnet_cifar20"]
QUIET = ["log.progress=false", "log.tensorboard=false", "log.plot=false", "train.threads=1"]


def _trained_like(name: str, **kwargs: object) -> nn.Module:
    """A model with every parameter moved off its init (zero-init gains, classifiers and PN
    parameters would make the comparisons vacuous)."""
    torch.manual_seed(0)
    model = normfree.create_model(name, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", FOLDABLE)
def test_prepare_for_inference_matches_eval_and_leaves_the_model_alone(name: str) -> None:
    model = _trained_like(name, num_classes=5).train()
    counts = folded_module_counts(model)
    assert sum(counts.values()) > 0
    fast = prepare_for_inference(model)
    assert model.training and sum(folded_module_counts(model).values()) == sum(counts.values())
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert not any(isinstance(m, (StdConv2dBase, ProxyNormActivation)) for m in fast.modules())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model.eval()(x)
        got = fast(x)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pt2_export_has_a_free_batch_and_a_sidecar(tmp_path: Path) -> None:
    model = _trained_like("gnpn_resnet_cifar20", num_classes=4).train()
    path = tmp_path / "sub" / "model.pt2"
    result = export_model(model, path, (3, 16, 16), metadata={"classes": list("abcd")})
    assert result.format == "pt2" and result.verified_with == "torch.export.load"
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert result.folded == {"ProxyNormActivation": 2 * 9 + 1}  # two per block + the final one
    assert model.training  # the export never changed the caller's model
    program = torch.export.load(str(path)).module()
    for batch in (1, 7):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    sidecar = json.loads((tmp_path / "sub" / "model.pt2.json").read_text())
    assert sidecar["input_shape"] == [3, 16, 16] and sidecar["metadata"]["classes"] == list("abcd")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt2", "model.pt2.json"]


def test_a_float64_model_is_checked_in_float64_and_a_format_must_fit_the_suffix(
    tmp_path: Path,
) -> None:
    model = _trained_like("nf_resnet_cifar20", num_classes=3).double()
    result = export_model(model, tmp_path / "m.pt2", (3, 16, 16))
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert next(model.parameters()).dtype == torch.float64  # the caller's model as it was
    with pytest.raises(ValueError, match=r"'pt2' but 'm\.onnx' has the suffix of format 'onnx'"):
        export_model(model.float(), tmp_path / "m.onnx", (3, 16, 16), format="pt2")
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_export_runs_in_an_onnx_runtime(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    model = _trained_like("nfnet_f0", num_classes=6, depths=(1, 1, 1, 1), widths=(32, 64, 96, 96),
                          group_size=8, stem_channels=(8, 8, 16))  # fmt: skip
    path = tmp_path / "nfnet.onnx"
    result = export_model(model, path, (3, 34, 34))  # odd size: asymmetric SAME padding
    assert result.verified_with in ("onnxruntime", "onnx.reference")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    proto = onnx.load(str(path))
    constants = {init.name for init in proto.graph.initializer}
    convs = [node for node in proto.graph.node if node.op_type == "Conv"]
    assert len(convs) > 5 and all(node.input[1] in constants for node in convs)  # WS folded
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch


def test_failed_check_keeps_the_old_file_and_leaves_no_temporaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _trained_like("nf_resnet_cifar20")
    path = tmp_path / "model.pt2"
    path.write_bytes(b"previous export")

    def broken_runner(p: Path):
        module = torch.export.load(str(p)).module()
        return (lambda x: module(x) + 1.0), "broken"

    monkeypatch.setattr(export_mod, "_pt2_runner", broken_runner)
    with pytest.raises(ExportError, match="differs from the eager model"):
        export_model(model, path, (3, 8, 8))
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


def test_bad_requests_are_clear_errors(tmp_path: Path) -> None:
    model = normfree.create_model("nf_resnet_cifar20")
    with pytest.raises(ValueError, match=r"\*\.onnx or \*\.pt2"):
        export_model(model, tmp_path / "m.bin", (3, 8, 8))
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(model, tmp_path / "m.onnx", (3, 8, 8), format="tflite")
    with pytest.raises(ValueError, match=r"three positive ints"):
        export_model(model, tmp_path / "m.pt2", (8, 8))
    with pytest.raises(ExportError, match="does not run"):
        export_model(model, tmp_path / "m.pt2", (5, 8, 8))  # the model takes 3 channels
    with pytest.raises(TypeError):
        prepare_for_inference("nf_resnet_cifar20")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_a_blocked_destination_fails_before_the_work_and_keeps_the_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model file and its sidecar are replaced together or not at all: a sidecar path taken
    by a folder, or an --out that is a folder, fails before anything is traced or written."""
    model = normfree.create_model("nf_resnet_cifar20")
    path = tmp_path / "model.pt2"
    path.write_bytes(b"previous export")
    (tmp_path / "model.pt2.json").mkdir()
    monkeypatch.setattr(export_mod, "_trace", lambda *a: pytest.fail("traced anyway"))
    with pytest.raises(OSError, match=r"cannot write .*model\.pt2\.json: it is a folder"):
        export_model(model, path, (3, 8, 8))
    assert path.read_bytes() == b"previous export"
    (tmp_path / "dir.pt2").mkdir()
    with pytest.raises(OSError, match=r"cannot write .*dir\.pt2: it is a folder"):
        export_model(model, tmp_path / "dir.pt2", (3, 8, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.pt2", "model.pt2", "model.pt2.json"]


def test_an_opset_the_exporter_cannot_write_is_an_error(tmp_path: Path) -> None:
    """torch's ONNX exporter writes opset 18 and converts down; when that fails it logs a
    traceback and keeps 18. normfree reports it and keeps the old file; an opset it writes is
    the opset in the file."""
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    model = normfree.create_model("nf_resnet_cifar20")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="cannot write this model at opset 3"):
        export_model(model, path, (3, 8, 8), opset=3, verify=False)
    newest = onnx.defs.onnx_opset_version()
    with pytest.raises(ExportError, match=f"opset {newest + 1} does not exist"):
        export_model(model, path, (3, 8, 8), opset=newest + 1, verify=False)
    assert path.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    export_model(model, path, (3, 8, 8), opset=18, verify=False)
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 18
    with pytest.raises(ExportError, match=r"an opset \(18\) is for ONNX files, not pt2"):
        export_model(model, tmp_path / "m.pt2", (3, 8, 8), opset=18)  # it used to be ignored
    assert not (tmp_path / "m.pt2").exists()


def test_export_command_refuses_sizes_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    for option in ("--image-size", "--opset"):
        with pytest.raises(SystemExit) as info:
            main(["export", "nf_resnet_cifar20", "--out", "m.onnx", option, "0"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: normfree export: ") and len(err.splitlines()) == 1, err
        assert f"argument {option}: expected a positive integer, got 0" in err


def test_export_command_from_a_training_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *QUIET, "train.epochs=1",
                 "train.max_steps_per_epoch=2"]) == 0  # fmt: skip
    out = tmp_path / "digits.pt2"
    assert main(["export", str(run / "best.pt"), "--out", str(out)]) == 0
    assert "checked with torch.export.load" in capsys.readouterr().out
    meta = json.loads(out.with_name("digits.pt2.json").read_text())
    assert meta["input_shape"] == [1, 8, 8] and meta["metadata"]["weights"] == "ema"
    assert meta["metadata"]["classes"] == [str(i) for i in range(10)]
    assert len(meta["metadata"]["mean"]) == 1 and meta["metadata"]["dataset"] == "digits"
    state = torch.load(run / "best.pt", weights_only=True)
    reference = normfree.create_model("nf_resnet_cifar20", num_classes=10, in_chans=1)
    reference.load_state_dict(state["ema"]["module"])
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        got = torch.export.load(str(out)).module()(x)
        torch.testing.assert_close(got, reference.eval()(x), rtol=1e-4, atol=1e-5)
    # errors: options that do not apply, unknown models, unreadable checkpoints
    assert main(["export", str(run / "best.pt"), "--out", str(out), "--weights", "w.pt"]) == 2
    assert "apply to a model SOURCE" in capsys.readouterr().err
    assert main(["export", "nf_resnet_cifar21", "--out", str(out)]) == 2
    assert "nf_resnet_cifar20" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad), "--out", str(out)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_a_model_name_exports_with_the_models_own_preprocessing(tmp_path: Path) -> None:
    """The sidecar of an architecture given by name records its declared mean and std (timm's
    ``pretrained_cfg``), as a checkpoint's records its dataset's."""
    out = tmp_path / "m.pt2"
    assert main(["export", "nf_resnet_cifar20", "--out", str(out), "--image-size", "8"]) == 0
    metadata = json.loads(out.with_name("m.pt2.json").read_text())["metadata"]
    declared = normfree.create_model("nf_resnet_cifar20").pretrained_cfg
    assert metadata["mean"] == pytest.approx(list(declared["mean"]))
    assert metadata["std"] == pytest.approx(list(declared["std"]))


def test_a_converted_training_checkpoint_exports_with_its_runs_data(tmp_path: Path) -> None:
    """`normfree convert` of a training checkpoint keeps the run's data (mean, std, classes) in
    the description, and `normfree export` of the converted file writes them to the sidecar."""
    quiet = ["log.progress=false", "log.tensorboard=false", "log.plot=false", "train.threads=1"]
    run = tmp_path / "bn"
    assert main(["train", "--out", str(run), *quiet, "model=bn_resnet_cifar20", "ema.enabled=false",
                 "data.spec=synthetic:num_classes=3,size=8,channels=1,n=40",
                 "train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=8"]) == 0
    converted, exported = tmp_path / "bn_free.safetensors", tmp_path / "m.pt2"
    assert main(["convert", str(run / "best.pt"), "--to", "bn_free", "--standalone-bn", "affine",
                 "--out", str(converted), "--image-size", "8"]) == 0  # fmt: skip
    assert main(["export", str(converted), "--out", str(exported)]) == 0
    metadata = json.loads(exported.with_name("m.pt2.json").read_text())["metadata"]
    info = torch.load(run / "best.pt", weights_only=True)["data_info"]
    assert metadata["mean"] == pytest.approx(info["mean"])
    assert metadata["std"] == pytest.approx(info["std"])
    assert metadata["classes"] == info["classes"] and metadata["dataset"] == info["name"]


def test_an_input_too_large_to_allocate_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """``--image-size 100000`` ended in PyTorch's allocator traceback."""

    def too_big(*args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 240000000000 bytes. Error code 12 (Cannot allocate "
            "memory)"
        )

    monkeypatch.setattr(export_mod, "export_model", too_big)
    out = tmp_path / "m.pt2"
    assert main(["export", "nf_resnet_cifar20", "--out", str(out), "--image-size", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: out of memory (223.5 GiB asked for): use a smaller --image-size"
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_features_only_backbone_exports_every_feature_map(tmp_path: Path, fmt: str) -> None:
    """A backbone returning a list of feature maps exports as a graph with one output per map
    (ONNX: output_0, output_1, ...), each checked against the eager model's."""
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = normfree.create_model("nf_resnet_cifar20", features_only=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / f"backbone.{fmt}"
    result = export_model(model, path, (3, 16, 16))
    assert result.verified_with is not None and result.max_abs_diff < 1e-4
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = model.eval()(x)
    if fmt == "pt2":
        got = torch.export.load(str(path)).module()(x)
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == [f"output_{i}" for i in range(4)]
        got = [torch.from_numpy(y) for y in session.run(None, {"input": x.numpy()})]
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    # the sidecar names each output and its shape (batch first), in the graph's order
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["outputs"] == [
        {"name": f"output_{i}", "shape": ["batch", *e.shape[1:]]} for i, e in enumerate(expected)
    ]
    assert [o["shape"][1] for o in sidecar["outputs"]] == model.feature_info.channels()


def test_a_model_returning_neither_tensor_nor_tensors_is_an_export_error(tmp_path: Path) -> None:
    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"y": self.conv(x)}

    with pytest.raises(ExportError, match="returns a dict; export takes a model that returns"):
        export_model(Dict(), tmp_path / "d.pt2", (3, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_converted_file_refuses_weights_and_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--override num_classes=3 on a converted-model file was ignored: the export went ahead with
    the file's own head and said nothing."""
    pytest.importorskip("torchvision")
    converted = tmp_path / "c.safetensors"
    assert main(["convert", "torchvision:resnet18[num_classes=4]", "--to", "bn_free",
                 "--out", str(converted), "--image-size", "8", "--batch", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    for extra in (["--override", "num_classes=3"], ["--weights", str(converted)]):
        rc = main(["export", str(converted), "--out", str(tmp_path / "m.pt2"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err == [
            "error: --weights/--override apply to a model SOURCE, not a converted-model file"
        ]
    assert not (tmp_path / "m.pt2").exists()


def test_export_command_of_a_features_only_backbone_reads_its_networks_metadata(
    tmp_path: Path,
) -> None:
    """`normfree export NAME[features_only=true]` asked for --image-size and wrote no mean/std:
    the backbone wrapper declares nothing, the network inside it does."""
    out = tmp_path / "backbone.pt2"
    assert main(["export", "nf_resnet_cifar20[features_only=true]", "--out", str(out)]) == 0
    sidecar = json.loads(out.with_name("backbone.pt2.json").read_text())
    declared = normfree.create_model("nf_resnet_cifar20").pretrained_cfg
    assert sidecar["input_shape"] == [3, 32, 32]
    assert sidecar["metadata"]["model"] == "nf_resnet_cifar20"
    assert sidecar["metadata"]["mean"] == pytest.approx(list(declared["mean"]))
    assert sidecar["metadata"]["std"] == pytest.approx(list(declared["std"]))
    outputs = torch.export.load(str(out)).module()(torch.randn(2, 3, 32, 32))
    assert [tuple(t.shape) for t in outputs] == [(2, 16, 32, 32), (2, 16, 32, 32),
                                                 (2, 32, 16, 16), (2, 64, 8, 8)]  # fmt: skip


def _small_nfnet() -> nn.Module:
    """An NFNet with "SAME" padding everywhere (strided convs, the shortcut's average pool),
    small enough to export in seconds."""
    return _trained_like("nfnet_f0", num_classes=6, depths=(1, 1, 1, 1), widths=(32, 64, 96, 96),
                         group_size=8, stem_channels=(8, 8, 16))  # fmt: skip


@pytest.mark.slow  # ~50 s each: torch.export with symbolic sizes through a whole NFNet
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_dynamic_size_export_takes_every_multiple_of_the_total_stride(
    tmp_path: Path, fmt: str
) -> None:
    """With size_multiple the saved model takes any height and width that are multiples of it,
    each size's SAME padding as the eager model's (odd multiples of 32 reach the stages with odd
    sizes, where the pads are asymmetric)."""
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        ort = pytest.importorskip("onnxruntime")
    model = _small_nfnet()
    assert export_mod.total_stride(model) == 32
    path = tmp_path / f"f0.{fmt}"
    result = export_model(model, path, (3, 64, 96), size_multiple=32)
    assert result.size_multiple == 32 and result.input_shape == (3, 64, 96)
    assert result.verified_with is not None and result.max_abs_diff < 1e-4
    if fmt == "pt2":
        program = torch.export.load(str(path)).module()

        def run(x: torch.Tensor) -> torch.Tensor:
            return program(x)
    else:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    for shape in [(1, 3, 64, 64), (2, 3, 96, 160), (1, 3, 224, 64)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model.eval()(x)
        assert expected.abs().max() > 1e-2
        torch.testing.assert_close(run(x), expected, rtol=1e-4, atol=1e-4)
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["size_multiple"] == 32 and sidecar["outputs"][0]["shape"] == ["batch", 6]


def test_a_dynamic_size_backbone_names_each_maps_reduction(tmp_path: Path) -> None:
    model = _trained_like("nf_resnet_cifar20", features_only=True)
    path = tmp_path / "backbone.pt2"
    result = export_model(model, path, (3, 8, 12), size_multiple=4)
    assert result.input_shape == (3, 8, 12) and result.max_abs_diff < 1e-4
    assert [o["shape"] for o in result.outputs] == [
        ["batch", 16, "height", "width"], ["batch", 16, "height", "width"],
        ["batch", 32, "height/2", "width/2"], ["batch", 64, "height/4", "width/4"],
    ]  # fmt: skip
    maps = torch.export.load(str(path)).module()(torch.randn(1, 3, 20, 8))
    assert [tuple(t.shape[2:]) for t in maps] == [(20, 8), (20, 8), (10, 4), (5, 2)]


def test_a_dynamic_size_export_refuses_what_it_cannot_keep(tmp_path: Path) -> None:
    model = _small_nfnet()
    with pytest.raises(ValueError, match=r"image size 48x64 is not a multiple of size_multiple="
                                         r"32; choose a size that is \(e\.g\. 64\)"):  # fmt: skip
        export_model(model, tmp_path / "m.pt2", (3, 48, 64), size_multiple=32)
    with pytest.raises(ValueError, match=r"size_multiple \(--dynamic-size\) must be 1 to"):
        export_model(model, tmp_path / "m.pt2", (3, 64, 64), size_multiple=0)
    with pytest.raises(TypeError, match="size_multiple must be an int"):
        export_model(model, tmp_path / "m.pt2", (3, 64, 64), size_multiple=True)
    with pytest.raises(ValueError, match="sizes up to 8192, got 8224x64"):
        export_model(model, tmp_path / "m.pt2", (3, 8224, 64), size_multiple=32)
    assert export_mod.total_stride(nn.Sequential(nn.Conv2d(3, 3, 1))) is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # ~2 min: torch.export gives up on the NFNet's symbolic shapes slowly
def test_a_dynamic_size_export_of_any_size_works_or_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    """Multiples of 1 (any size): either every size gives the eager model's output, or the
    export is refused in one line that names the fix, and nothing is written (PyTorch 2.14
    cannot prove the shapes of the SAME pads' parity: refused)."""
    model = _small_nfnet()
    path = tmp_path / "any.pt2"
    try:
        export_model(model, path, (3, 34, 34), size_multiple=1)
    except ExportError as e:
        assert "\n" not in str(e) and "choose a multiple of 32, the model's total stride" in str(e)
        assert list(tmp_path.iterdir()) == []
    else:
        program = torch.export.load(str(path)).module()
        for size in (33, 35, 40):
            x = torch.randn(1, 3, size, size + 1)
            with torch.no_grad():
                torch.testing.assert_close(program(x), model.eval()(x), rtol=1e-4, atol=1e-4)


def test_export_command_dynamic_size_reads_the_models_stride(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.pt2"
    assert main(["export", "nf_resnet_cifar20", "--out", str(out), "--dynamic-size",
                 "--image-size", "16"]) == 0  # fmt: skip
    assert "input (B, 3, H, W; H and W multiples of 4 from 8 to 8192)" in capsys.readouterr().out
    sidecar = json.loads(out.with_name("m.pt2.json").read_text())
    assert sidecar["size_multiple"] == 4
    assert sidecar["metadata"]["input"].endswith("B is free, H and W multiples of 4 from 8 to 8192")
    assert torch.export.load(str(out)).module()(torch.randn(2, 3, 12, 20)).shape == (2, 10)
    rc = main(["export", "nf_resnet_cifar20", "--out", str(out), "--dynamic-size", "8",
               "--image-size", "12"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        "error: --image-size 12 is not a multiple of --dynamic-size 8: choose one that is "
        "(e.g. 16)"
    ]
    # a declared size that is no multiple (EfficientNet-B1's 240) is only the traced size:
    # the nearest multiple is traced instead
    assert main(["export", "nf_resnet_cifar20[num_classes=3]", "--out", str(out),
                 "--dynamic-size", "12"]) == 0  # fmt: skip
    assert "input (B, 3, H, W; H and W multiples of 12 from 24 to 8192)" in capsys.readouterr().out
    assert json.loads(out.with_name("m.pt2.json").read_text())["input_shape"] == [3, 36, 36]
    assert not list(tmp_path.glob(".m.pt2.*"))


def test_a_dynamic_size_onnx_file_has_a_symbolic_height_and_width(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _trained_like("nf_resnet_cifar20", num_classes=3)
    path = tmp_path / "m.onnx"
    result = export_model(model, path, (3, 8, 8), size_multiple=4)
    assert result.verified_with == "onnxruntime" and result.max_abs_diff < 1e-4
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 8, 24), (2, 3, 28, 12)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model.eval()(x)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # any other size is refused, not answered with the pads of the multiples
    for shape in [(1, 3, 9, 8), (1, 3, 8, 14)]:
        with pytest.raises(Exception, match="cannot be reshaped to the requested shape"):
            session.run(None, {"input": torch.randn(shape).numpy()})


def test_dynamic_size_of_a_model_without_feature_info_measures_the_multiple(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A converted torchvision ResNet-18 declares no ``feature_info``: a bare
    ``--dynamic-size`` takes its measured total stride, 32, says so, and the file takes
    96×64."""
    pytest.importorskip("torchvision")
    converted = tmp_path / "c.safetensors"
    assert main(["convert", "torchvision:resnet18[num_classes=4]", "--to", "bn_free",
                 "--out", str(converted), "--image-size", "32", "--batch", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "m.pt2"
    assert main(["export", str(converted), "--out", str(out), "--dynamic-size"]) == 0
    assert "its measured total stride is 32" in capsys.readouterr().err
    assert json.loads(Path(f"{out}.json").read_text())["size_multiple"] == 32
    program = torch.export.load(str(out)).module()
    assert program(torch.randn(2, 3, 96, 64)).shape == (2, 4)


class _Strided(nn.Module):
    """A stride-32 model that declares its stride; returns the map, a pooled 1×1 map and a
    pooled 2×2 map (sizes that do not follow the input's)."""

    feature_info: ClassVar[list[dict[str, object]]] = [
        {"num_chs": 2, "reduction": 32, "module": "conv"}
    ]

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 32, stride=32)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.conv(x)
        return [y, nn.functional.adaptive_avg_pool2d(y, 1), nn.functional.adaptive_avg_pool2d(y, 2)]


def test_a_dynamic_size_export_at_the_largest_size_checks_a_size_it_takes(tmp_path: Path) -> None:
    """Traced at 8192 high, the second check ran at 8224 (traced + the multiple), above what the
    program takes: the .pt2 program's guard raised an AssertionError (a traceback from the
    command); a multiple that leaves no free size failed in torch.export."""
    torch.manual_seed(0)
    path = tmp_path / "m.pt2"
    result = export_model(_Strided(), path, (3, 8192, 64), size_multiple=32)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    with pytest.raises(ValueError, match=r"\(--dynamic-size\) must be 1 to 2730, got 2731"):
        export_model(_Strided(), path, (3, 5462, 5462), size_multiple=2731)


def test_a_dynamic_size_sidecar_names_only_the_sizes_that_follow_the_input(
    tmp_path: Path,
) -> None:
    """A pooled map's height and width are fixed: they read 1 and 2, not "height/64"."""
    torch.manual_seed(0)
    result = export_model(_Strided(), tmp_path / "m.pt2", (3, 64, 128), size_multiple=32)
    assert [o["shape"] for o in result.outputs] == [
        ["batch", 2, "height/32", "width/32"], ["batch", 2, 1, 1], ["batch", 2, 2, 2],
    ]  # fmt: skip


def test_a_saved_file_that_cannot_run_the_check_is_one_short_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .pt2 program's guard (a size it does not take) raised a bare AssertionError whose text
    can run to thousands of characters: now an ExportError of one short line, nothing written."""

    def refusing_runner(p: Path):
        def run(x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("Guard failed: " + "x.size()[2] + " * 100 + "1 > 0")

        return run, "refusing"

    monkeypatch.setattr(export_mod, "_pt2_runner", refusing_runner)
    with pytest.raises(ExportError) as raised:
        export_model(_trained_like("nf_resnet_cifar20"), tmp_path / "m.pt2", (3, 8, 8))
    message = str(raised.value)
    assert message.startswith("the exported model does not run on an input of shape (3, 3, 8, 8)")
    assert "\n" not in message and len(message) < 400 and message.endswith("nothing was written to "
                                                                          f"{tmp_path / 'm.pt2'}")
    assert list(tmp_path.iterdir()) == []


def test_export_command_refuses_an_out_that_is_a_file_it_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--format pt2 --out`` the ``--weights`` file (or the checkpoint SOURCE, or a file the
    sidecar PATH.json would be) replaced the input with the export: refused, input unchanged."""
    weights = tmp_path / "w.pt"
    torch.save(normfree.create_model("nf_resnet_cifar20").state_dict(), weights)
    before = weights.read_bytes()
    for out in (weights, tmp_path / "w"):  # the model file itself; a sidecar w.json
        sidecar_input = tmp_path / "w.json"
        if out.name == "w":
            weights = weights.rename(sidecar_input)
        rc = main(["export", "nf_resnet_cifar20", "--weights", str(weights), "--format", "pt2",
                   "--out", str(out), "--image-size", "8"])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "would overwrite the --weights file" in err[0], err
        assert weights.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json"]


@pytest.mark.slow  # a dynamic-size torch.export of a ResNet-20: ~14 s
def test_a_multiple_not_of_the_stride_that_the_program_cannot_take_names_the_fix(
    tmp_path: Path,
) -> None:
    """``size_multiple=3`` of a stride-4 ResNet: the .pt2 program traced at 12×12 holds a stage
    size's parity and refused the second check (15×18) with only PyTorch's guard; the error now
    names the fix (a multiple of the total stride), and nothing is written."""
    model = _trained_like("nf_resnet_cifar20", num_classes=3)
    path = tmp_path / "m.pt2"
    try:
        export_model(model, path, (3, 12, 12), size_multiple=3)
    except ExportError as e:
        message = str(e)
        assert "\n" not in message and message.startswith("the exported model does not run on")
        assert message.endswith("the saved model does not take every multiple of 3: choose a "
                                "multiple of 4, its total stride (--dynamic-size), or export at "
                                "a fixed size")  # fmt: skip
        assert list(tmp_path.iterdir()) == []
    else:  # a PyTorch that proves the shapes: every multiple of 3 gives the eager outputs
        x = torch.randn(1, 3, 15, 21)
        with torch.no_grad():
            expected = model.eval()(x)
            torch.testing.assert_close(torch.export.load(str(path)).module()(x), expected,
                                       rtol=1e-4, atol=1e-4)  # fmt: skip


def test_a_model_without_feature_info_gets_its_measured_total_stride(capsys) -> None:
    """A converted model declares no ``feature_info``; a bare ``--dynamic-size`` used to stop
    with "give it, e.g. --dynamic-size 32" (wrong for a CIFAR ResNet, whose stride is 4). The
    stride is now measured (the feature maps that double with the input): equal to the
    declared one on the models that declare it, 4 for a converted CIFAR ResNet; a model with
    no feature map that scales still gets the one-line error."""
    from normfree.convert import convert_model
    from normfree.deploy import measured_stride, total_stride
    from normfree.deploy.cli import _size_multiple

    for name in ("nf_resnet_cifar20", "nf_regnet_b0"):
        model = normfree.create_model(name)
        assert measured_stride(model, 3) == total_stride(model) == {"nf_resnet_cifar20": 4}.get(
            name, 32
        )
    torch.manual_seed(0)
    source = normfree.create_model("bn_resnet_cifar20", num_classes=10).eval()
    converted = convert_model(source, "bn_free", torch.randn(2, 3, 16, 16), standalone_bn="affine")
    assert total_stride(converted) is None and converted.training is False
    assert _size_multiple(converted, 0, 3) == 4 and converted.training is False
    assert "its measured total stride is 4" in capsys.readouterr().err
    assert _size_multiple(converted, 8, 3) == 8  # a value given is taken as it is
    flat = nn.Sequential(nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="its total stride is unknown: give it"):
        _size_multiple(flat, 0, 3)
