"""`normfree convert`, `normfree eval` of a converted file and the `model=converted:PATH` hook of
the trainer, on a tiny BN ResNet (width 4) and the bundled digits."""

from __future__ import annotations

import pytest

from normfree.cli import main
from normfree.convert import ConvertedModel, load_converted

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

    from normfree.train.builders import build_model
    from normfree.train.config import ConfigError

    built = build_model({"name": f"converted:{out}", "num_classes": 10, "in_chans": 1,
                         "kwargs": {}})  # fmt: skip
    assert isinstance(built, ConvertedModel) and built.training
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
