"""`normfree convert`, `normfree eval` of a converted file and the `model=converted:PATH` hook of
the trainer, on a tiny BN ResNet (width 4) and the bundled digits."""

from __future__ import annotations

import json
import warnings

import pytest

from normfree.cli import main
from normfree.convert import ConvertedModel, load_converted
from normfree.convert.cli import evaluate_converted_file

pytest.importorskip("sklearn")
SPEC = "normfree.convert.experiment:bn_resnet_small[width=4]"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_convert_eval_and_train_hook(tmp_path, capsys):
    out = tmp_path / "nf.safetensors"
    rc = main(["convert", SPEC, "--to", "nf", "--out", str(out), "--data", "digits",
               "--calib-batches", "1", "--batch", "16",
               "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "biases calibrated" in text and "relative logit error" in text
    model = load_converted(out)
    assert isinstance(model, ConvertedModel) and model.in_chans == 1 and model.num_classes == 10
    assert main(["eval", str(out), "--data", "digits", "--batch-size", "128"]) == 0
    assert "top1" in capsys.readouterr().out
    # eval's other options reach a converted file too (they were ignored silently)
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--data", "digits", "--test-size", "12", "--precision",
                 "bf16", "--workers", "1", "--json", str(report)]) == 0  # fmt: skip
    result = json.loads(report.read_text())
    assert result["test_size"] == 12 and result["count"] == 359  # round(1797 · 0.2)
    with pytest.raises(ValueError, match="precision"):
        evaluate_converted_file(str(out), "digits", precision="fp8")

    from normfree.train.builders import build_model
    from normfree.train.config import ConfigError

    built = build_model({"name": f"converted:{out}", "num_classes": 10, "in_chans": 1,
                         "kwargs": {}})  # fmt: skip
    assert isinstance(built, ConvertedModel) and built.training
    from normfree.train.checkpointing import check_weights_fit

    args = {"name": f"converted:{out}", "num_classes": 10, "in_chans": 1, "kwargs": {}}
    with warnings.catch_warnings():  # `normfree eval` of such a run: its skeleton on meta
        warnings.simplefilter("error")  # was one "copying ... to a meta parameter" per tensor
        check_weights_fit(args, built.state_dict(), "best.pt")
    with pytest.raises(ConfigError, match="10-class model on 1 channels"):
        build_model({"name": f"converted:{out}", "num_classes": 3, "in_chans": 1, "kwargs": {}})


def test_convert_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x.pt"
    rc = main(["convert", "torch.nn:Identity", "--to", "bn_free", "--out", str(out),
               "--image-size", "8"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "no BatchNorm2d" in err[-1]
    assert not out.exists()
    rc = main(["convert", SPEC, "--to", "bn_free", "--out", str(tmp_path / "x.txt"),
               "--image-size", "8"])  # fmt: skip
    assert rc == 2 and "--out must end in" in capsys.readouterr().err
    rc = main(["convert", SPEC, "--to", "nf", "--out", str(out),
               "--data", "synthetic:num_classes=10,size=8,channels=3,n=16"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "has 3 channels but the model takes 1" in err[-1]
    factory = SPEC.partition("[")[0]
    rc = main(["convert", f"{factory}[width=abc]", "--to", "nf", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"error: cannot build '{factory}' with {{'width':")
    assert not out.exists()


def test_a_pickled_converted_module_is_read_only_on_the_opt_in(tmp_path, capsys):
    """`normfree convert --trust-pickle` of a pickled module writes a pickled converted module;
    export, eval, spp and diagnose read it with their --trust-pickle; without it the refusal
    names the file, what it holds and the opt-in (not "unknown model")."""
    pytest.importorskip("onnxscript")
    import torch

    from normfree.convert.experiment import bn_resnet_small

    torch.save(bn_resnet_small(width=4), tmp_path / "mod.pt")
    converted, onnx_file = tmp_path / "gn.pt", tmp_path / "gn.onnx"
    assert main(["convert", str(tmp_path / "mod.pt"), "--trust-pickle", "--to", "gn",
                 "--out", str(converted), "--image-size", "8"]) == 0  # fmt: skip
    assert "`--trust-pickle` of eval, spp, diagnose and export" in capsys.readouterr().out
    data = "synthetic:num_classes=10,size=8,channels=1,n=16"
    commands = (["export", str(converted), "--out", str(onnx_file)],
                ["spp", str(converted), "--image-size", "8"],
                ["diagnose", str(converted), "--image-size", "8", "--no-batch-check"],
                ["eval", str(converted), "--data", data])  # fmt: skip
    for argv in commands:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{converted} holds pickled Python objects" in err
        assert "unknown model" not in err and "--trust-pickle" in err, err
        assert "ConvertedModel" in err or argv[0] == "eval"  # eval reads it as a checkpoint
    assert not onnx_file.exists()
    for argv in commands[1:]:
        assert main([*argv, "--trust-pickle"]) in (0, 1), argv  # diagnose: 1 = problems found
        out = capsys.readouterr().out
        assert ("top1" in out) if argv[0] == "eval" else out.strip(), argv
    assert main(["export", str(converted), "--out", str(onnx_file), "--trust-pickle",
                 "--image-size", "8"]) == 0  # fmt: skip
    assert "checked with" in capsys.readouterr().out and onnx_file.is_file()


def test_convert_experiment_runs_end_to_end_and_checks_its_options(tmp_path, capsys):
    """The docs/convert.md experiment at its smallest: pretrain, convert with every mode,
    fine-tune the conversions (SGD with AGC attached) and write the results."""
    out = tmp_path / "r.json"
    assert main(["convert-experiment", "--pretrain-steps", "2", "--finetune-steps", "1",
                 "--batch-sizes", "2", "--width", "4", "--json", str(out)]) == 0  # fmt: skip
    import json

    curves = json.loads(out.read_text())["curves"]
    assert set(curves) == {"bn", "bn_free", "nf", "gn", "gnpn"}
    assert all([step for step, _ in c["2"]] == [0, 1] for c in curves.values())
    assert main(["convert-experiment", "--pretrain-steps", "2", "--finetune-steps", "0",
                 "--batch-sizes", "2", "--width", "4", "--json", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["curves"]["nf"]["2"] == [[0, pytest.approx(
        json.loads(out.read_text())["curves"]["nf"]["2"][0][1])]]  # conversion only
    capsys.readouterr()
    for bad, needle in ((["--batch-sizes", "0"], "batch_sizes[0] must be an int >= 1"),
                        (["--finetune-lr", "nan"], "finetune_lr must be a positive finite")):
        assert main(["convert-experiment", "--pretrain-steps", "2", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_the_experiment_optimizer_is_sgd_with_agc_attached():
    import torch

    from normfree.convert.experiment import _optimizer

    model = torch.nn.Linear(4, 3)
    opt = _optimizer(model, lr=1.0, clipping=0.01)
    assert isinstance(opt, torch.optim.SGD)
    with torch.no_grad():
        model.weight.fill_(1.0)
    model.weight.grad = torch.full_like(model.weight, 1e6)
    model.bias.grad = torch.zeros_like(model.bias)
    opt.step()  # AGC: each row's gradient clipped to 0.01 x its weight norm (2.0), + decay
    expected = 1.0 - (0.01 + 5e-5)  # the clipped gradient's entries 0.01, weight decay 5e-5
    torch.testing.assert_close(model.weight, torch.full_like(model.weight, expected))


_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
    "memory: you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)"
)


def _too_big(*args: object, **kwargs: object) -> None:
    raise RuntimeError(_OOM)


def test_an_input_too_large_to_allocate_is_one_line(tmp_path, monkeypatch, capsys):
    """``convert``/``eval`` of a converted file with ``--image-size 100000`` ended in
    PyTorch's allocator traceback."""
    monkeypatch.setattr("normfree.convert.convert_model", _too_big)
    out = tmp_path / "x.pt"
    assert main(["convert", SPEC, "--to", "nf", "--out", str(out), "--image-size", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    fix = "error: out of memory (37.3 GiB asked for): use a smaller --image-size or --batch"
    assert err[-1] == fix and not out.exists()
    monkeypatch.setattr("normfree.convert.is_converted_file", lambda path: True)
    monkeypatch.setattr("normfree.convert.cli.evaluate_converted_file", _too_big)
    assert main(["eval", str(out), "--data", "digits", "--image-size", "100000"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: out of memory (37.3 GiB asked for): use a smaller --test-size / --image-size or "
        "--batch-size"
    )


def test_eval_of_a_converted_file_checks_its_json_path_first(tmp_path, monkeypatch, capsys):
    """An unwritable ``--json`` was found only after the evaluation, as a traceback."""
    ran: list[str] = []
    monkeypatch.setattr("normfree.convert.is_converted_file", lambda path: True)
    monkeypatch.setattr("normfree.convert.cli.evaluate_converted_file",
                        lambda *a, **k: ran.append("eval"))  # fmt: skip
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    target = blocker / "r.json"  # below a regular file: can never be created
    assert main(["eval", str(tmp_path / "m.pt"), "--data", "digits", "--json", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write {target}") and len(err.splitlines()) == 1
    assert ran == []  # refused before the evaluation


def test_an_output_that_is_another_output_or_the_source_is_refused(tmp_path, capsys):
    """--json naming the --out file replaced the converted model by the JSON report (and
    "wrote" it); --out naming the SOURCE file overwrote the model being converted."""
    from normfree.checkpoints.io import atomic_save

    out = tmp_path / "m.safetensors"
    rc = main(["convert", SPEC, "--to", "bn_free", "--out", str(out), "--image-size", "8",
               "--json", str(tmp_path / "." / "m.safetensors")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --json and --out are the same file")
    assert not out.exists()
    source = tmp_path / "model.pt"
    atomic_save({"format": "something"}, source)
    before = source.read_bytes()
    for flag in ("--out", "--json"):
        args = ["convert", str(source), "--to", "bn_free", "--image-size", "8"]
        args += ["--out", str(tmp_path / "o.pt")] if flag == "--json" else []
        rc = main([*args, flag, str(source)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1] == (f"error: {flag} {source} is the SOURCE file: writing it "
                                       "would destroy the model being converted; write the "
                                       "result to another file")  # fmt: skip
        assert source.read_bytes() == before


def test_a_missing_source_file_is_named_as_a_missing_file(tmp_path, capsys):
    """A SOURCE path that does not exist was read as a normfree model name ("cannot build
    'normfree:runs/x/best.pt': unknown model")."""
    for source in ("missing.pt", str(tmp_path / "runs" / "best")):
        rc = main(["convert", source, "--to", "bn_free", "--out", str(tmp_path / "o.pt"),
                   "--image-size", "8"])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err == [f"error: no file {source!r} (an architecture is "
                                   "torchvision:NAME, timm:NAME, a normfree NAME or "
                                   "module:factory)"]  # fmt: skip
    assert not (tmp_path / "o.pt").exists()


def test_a_float64_converted_file_evaluates_and_trains_in_float32(tmp_path):
    """load_converted keeps a float64 file's dtype; eval and the trainer's hook, which feed
    float32 data, take it as float32 (eval stopped with a dtype-mismatch traceback)."""
    import torch

    from normfree.convert import build_converted, convert_model, save_converted
    from normfree.convert.experiment import bn_resnet_small

    kwargs = {"num_classes": 10, "in_chans": 1, "width": 4}
    model = bn_resnet_small(**kwargs).double()
    model.train()(torch.randn(4, 1, 8, 8, dtype=torch.float64))
    c = convert_model(model.eval(), "bn_free", source=SPEC.partition("[")[0],
                      source_kwargs=kwargs)  # fmt: skip
    out = tmp_path / "f64.safetensors"
    save_converted(c, out)
    assert next(load_converted(out).parameters()).dtype == torch.float64
    result = evaluate_converted_file(str(out), "digits", batch_size=512)
    assert result["count"] == 359
    built = build_converted(f"converted:{out}", 10, 1)
    assert built.training and {p.dtype for p in built.parameters()} == {torch.float32}


def test_converting_a_converted_file_says_so(tmp_path, capsys):
    """A converted file as SOURCE was called "neither a normfree training checkpoint nor a
    normfree model file; for a bare state dict give the architecture as SOURCE"."""
    first = tmp_path / "bn_free.safetensors"
    assert main(["convert", SPEC, "--to", "bn_free", "--out", str(first),
                 "--image-size", "8", "--batch", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    rc = main(["convert", str(first), "--to", "nf", "--out", str(tmp_path / "nf.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: {first} is already a converted model (a `normfree convert` "
                               "output, without BatchNorm): convert the BatchNorm model it came "
                               "from"]  # fmt: skip
    assert not (tmp_path / "nf.pt").exists()


def test_a_converted_checkpoint_keeps_its_run_s_size_and_data(tmp_path, capsys):
    """A digits run's checkpoint converted without --data: the noise batch is 8×8, the run's
    size (it was the model's 32 px, which became the file's test size and its export's input),
    and ``normfree eval`` of the file uses the recorded digits (it asked for --data)."""
    from normfree.convert import load_converted
    from normfree.train import train
    from normfree.train.config_io import resolve_config

    run = tmp_path / "run"
    overrides = [f"out_dir={run}", "model=bn_resnet_cifar20", "train.epochs=1",
                 "train.max_steps_per_epoch=2", "log.progress=false"]  # fmt: skip
    train(resolve_config(overrides=overrides))
    capsys.readouterr()
    out = tmp_path / "bnfree.pt"
    assert main(["convert", str(run / "last.pt"), "--to", "bn_free", "--standalone-bn", "affine",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "Gaussian noise at 8×8 (its training run's size)" in capsys.readouterr().err
    assert load_converted(out).meta.test_size == 8
    assert main(["eval", str(out), "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["data"] == "digits" and result["count"] == 359
