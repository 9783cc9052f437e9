"""The typed training config: recipes, YAML files, dotted overrides, errors that name the key,
and the generated ``--help``."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from normfree.cli import build_parser, main
from normfree.nn.native import KERNELS
from normfree.train import (
    Config,
    ConfigError,
    config_from_dict,
    config_help,
    config_to_dict,
    dump_config,
    list_recipes,
    resolve_config,
)
from normfree.train.builders import peak_lr
from normfree.train.config import native_kernel_choice


def _leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_no_arguments_is_the_digits_recipe() -> None:
    cfg = resolve_config()
    assert cfg.model == "nf_resnet_cifar20" and cfg.data.spec == "digits"
    assert cfg.train.batch_size == 64 and peak_lr(cfg) == pytest.approx(0.4)


def test_paper_defaults_without_recipe() -> None:
    cfg = resolve_config(recipe="none")
    o = cfg.optim
    assert (o.name, o.momentum, o.nesterov, o.clipping, o.agc_eps) == ("sgd", 0.9, True, 0.01, 1e-3)
    assert o.weight_decay == 2e-5 and not o.clip_classifier
    assert cfg.train.label_smoothing == 0.1 and cfg.schedule.decay == "cosine"
    assert cfg.ema.enabled and cfg.ema.warmup and cfg.ema.decay == 0.99999
    assert peak_lr(cfg) == pytest.approx(0.1 * 4096 / 256)


def test_shipped_recipes_resolve() -> None:
    assert {"digits", "cifar", "nfnet_imagenet"} <= set(list_recipes())
    for name in list_recipes():
        resolve_config(recipe=name)
    imagenet = resolve_config(recipe="nfnet_imagenet")
    assert imagenet.model == "nfnet_f0" and peak_lr(imagenet) == pytest.approx(1.6)
    assert imagenet.data.randaugment == "model" and imagenet.train.stochdepth_rate == 0.25
    with pytest.raises(ConfigError, match="unknown recipe 'imagenette'"):
        resolve_config(recipe="imagenette")


def test_overrides_are_typed() -> None:
    cfg = resolve_config(
        overrides=[
            "model=nfnet_f0",
            "optim.lr=0.2",
            "optim.weight_decay=1e-4",  # YAML 1.1 reads this as a string: still a float
            "data=cifar10:/data/cifar-10-batches-py",  # section shorthand for data.spec
            "data.randaugment=[2, 9]",
            "data.flip=true",
            "model_kwargs.width=2",
            "optim.betas=0.8,0.99",
            "train.precision=bf16",
            "train.native_kernels=[tanh_gelu]",
            "out_dir=runs/x",
        ]
    )
    assert cfg.train.native_kernels == ("tanh_gelu",)
    for value, choice in [("tanh_gelu", ("tanh_gelu",)), ("scaled_ws+tanh_gelu", KERNELS),
                          ("true", True), ("null", None), ("[]", ())]:  # fmt: skip
        kept = resolve_config(overrides=[f"train.native_kernels={value}"]).train.native_kernels
        assert native_kernel_choice(kept) == choice
    assert cfg.model == "nfnet_f0" and cfg.optim.lr == 0.2 and cfg.optim.weight_decay == 1e-4
    assert cfg.data.spec == "cifar10:/data/cifar-10-batches-py"
    assert cfg.data.randaugment == (2, 9) and cfg.data.flip is True
    assert cfg.model_kwargs == {"width": 2} and cfg.optim.betas == (0.8, 0.99)
    assert cfg.train.precision == "bf16" and cfg.out_dir == "runs/x"
    assert resolve_config(overrides=["optim.lr=0.2", "optim.lr=null"]).optim.lr is None


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lrr=0.1", "optim.lrr"),
        ("optimizer.lr=0.1", "optimizer"),
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("data.flip=maybe", "data.flip"),
        ("train.precision=fp8", "train.precision"),
        ("data.randaugment=[1,2,3]", "data.randaugment"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.label_smoothing=1.0", "train.label_smoothing"),
        ("optim=sgd", "optim"),
        ("optim.lr", "optim.lr"),
        ("train.epochs=true", "train.epochs"),
        ("data.image_size=[", "data.image_size"),
        ("train.native_kernels=[bogus]", "train.native_kernels"),
        ("train.native_kernels=bogus", "train.native_kernels"),
        ("train.native_kernels=2", "train.native_kernels"),
        ("distill.teacher=", "distill.teacher"),  # was the current folder: '.' holds no best.pt
        ("distill.teacher=  ", "distill.teacher"),
    ],
)
def test_bad_overrides_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config(overrides=[override])


def test_the_nfnet_recipe_clips_the_classifier_bias_as_the_official_code() -> None:
    assert resolve_config("nfnet_imagenet").optim.clip_classifier == "bias"
    assert resolve_config("digits").optim.clip_classifier is False  # the paper's reading
    assert resolve_config(overrides=["optim.clip_classifier=true"]).optim.clip_classifier is True
    with pytest.raises(ConfigError, match=r"optim\.clip_classifier"):
        resolve_config(overrides=["optim.clip_classifier=weight"])


def test_unknown_key_suggests_close_name() -> None:
    with pytest.raises(ConfigError, match="did you mean lr"):
        resolve_config(overrides=["optim.lrr=0.1"])


def test_yaml_file_layering_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "cfg.yaml"
    good.write_text("model: nfnet_f0\ntrain:\n  epochs: 3\noptim:\n  lr: 0.05\n")
    cfg = resolve_config(config_file=good, overrides=["train.epochs=4"])
    assert cfg.model == "nfnet_f0" and cfg.optim.lr == 0.05 and cfg.train.epochs == 4
    assert cfg.train.batch_size == 4096  # a file alone starts from the paper defaults
    assert resolve_config("digits", good).train.batch_size == 64  # recipe, then file
    with pytest.raises(ConfigError, match="is a folder; --config takes a YAML file"):
        resolve_config(config_file=tmp_path)  # said "does not exist"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        resolve_config(config_file=bad)
    bad.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        resolve_config(config_file=bad)
    bad.write_text("train: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(config_file=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(config_file=tmp_path / "missing.yaml")
    # a section whose keys are all commented out is empty (YAML null), not an error
    empty = tmp_path / "empty_sections.yaml"
    empty.write_text("train:\n  epochs: 3\ndistill:\n  # teacher: runs/bn\nema:\n")
    cfg = resolve_config(config_file=empty)
    assert cfg.train.epochs == 3 and cfg.distill.teacher is None and cfg.ema.enabled


def test_dump_and_reload_roundtrip(tmp_path: Path) -> None:
    cfg = resolve_config(overrides=["data.randaugment=[2,9]", "model_kwargs.width=2"])
    dump_config(cfg, tmp_path / "c.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


def test_help_documents_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    text = config_help()
    for key in _leaf_keys():
        assert f"  {key} (" in text, key
    assert "[digits: 64]" in text  # the recipe's value next to the default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for key in _leaf_keys():
        assert key in out, key
    assert "--resume" in out and "--nproc" in out and "--recipe" in out


def test_print_config_and_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--print-config", "optim.lr=0.3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.3 and printed["model"] == "nf_resnet_cifar20"
    assert main(["train", "--print-config", "optim.bogus=1"]) == 2
    assert "optim.bogus" in capsys.readouterr().err


def test_bad_model_and_data_are_clean_cli_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Input errors end in one ``error:`` line and exit code 2, before any run folder is made."""
    out = f"out_dir={tmp_path / 'runs'}"
    assert main(["train", "--print-config", "model=nf_resnet_cifar21"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nf_resnet_cifar21'" in err and "nf_resnet_cifar20" in err
    missing = tmp_path / "no_cifar"
    assert main(["train", out, "--data", f"cifar10:{missing}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.spec=") and str(missing) in err and "Traceback" not in err
    assert main(["train", out, "model_kwargs.width=0"]) == 2
    assert "width must be a positive int" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["train", "--out", str(tmp_path / "a_file" / "run")]) == 2
    assert "cannot create the run folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_retired_debug_section_of_older_files_is_ignored() -> None:
    """Checkpoints and config.yaml files written before fault injection left the config hold a
    ``debug`` section; they still load (the section is dropped)."""
    old = config_to_dict(resolve_config())
    old["debug"] = {"stop_after_steps": None, "nonfinite_at_step": None, "step_sleep_s": 0.0}
    assert config_from_dict(old) == resolve_config()
    with pytest.raises(ConfigError, match="unknown config key 'debug'"):
        resolve_config(overrides=["debug.step_sleep_s=1"])


def test_type_errors_name_the_expected_type() -> None:
    with pytest.raises(ConfigError, match=r"'train\.epochs': expected int, got 'abc'"):
        resolve_config(overrides=["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"'data\.image_size': expected int \| null, got 1\.5"):
        resolve_config(overrides=["data.image_size=1.5"])
    with pytest.raises(ConfigError, match=r"'train\.precision': expected \{fp32,bf16,fp16\}"):
        resolve_config(overrides=["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"expected int, got True"):
        resolve_config(overrides=["train.epochs=true"])  # pydantic alone would read 1


@pytest.mark.parametrize(
    "override",
    ["optim.clipping=.inf", "optim.agc_eps=.inf", "optim.lr=.inf", "optim.base_lr=.inf",
     "optim.weight_decay=.inf", "optim.lr=.nan", "optim.weight_decay=.nan", "optim.lr=inf",
     "optim.momentum=.nan", "optim.betas=[0.9,.inf]", "optim.clip_grad_norm=.inf",
     "ema.decay=.nan", "train.finetune_lr_scale=.inf", "schedule.warmup_epochs=.inf"],
)  # fmt: skip
def test_non_finite_numbers_are_refused(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{key}' must be (a )?finite number"):
        resolve_config(overrides=[override])


def test_non_finite_number_is_one_cli_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--print-config", "optim.clipping=.inf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'optim.clipping' must be a finite number (default 0.01), got inf" in err


@pytest.mark.parametrize("seed", [2**64 - 1, 2**63, -(2**63) - 1, 10**20])
def test_a_seed_torch_cannot_take_is_one_cli_line(
    seed: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch's generators take 64-bit seeds and the run seeds epoch ``e``'s loader with
    ``seed + e``: 2**64 - 1 trained its first epoch, then the second ended in a traceback
    (``Overflow when unpacking long long``); larger seeds failed at the start."""
    assert main(["train", "--print-config", f"seed={seed}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"'seed' must be an integer in [-2**63, 2**63), got {seed}" in err
    for fine in (0, -1, 2**63 - 1, -(2**63)):  # the edges of the range are accepted
        assert resolve_config(overrides=[f"seed={fine}"]).seed == fine


def test_options_and_overrides_come_in_any_order(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--print-config", "train.epochs=1", "--compile", "train.precision=bf16",
            "--data", "synthetic", "train.epochs=3"]  # fmt: skip
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["precision"] == "bf16" and printed["train"]["compile"] is True
    assert printed["train"]["epochs"] == 3 and printed["data"]["spec"] == "synthetic"
    with pytest.raises(SystemExit) as e:  # anything else left over is still refused
        main(["train", "--print-config", "train.epochs=1", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_spellings_of_one_native_kernel_choice_are_no_change() -> None:
    from normfree.train import config_diff

    def kernels(value: str) -> Config:
        return resolve_config(overrides=[f"train.native_kernels={value}"])

    assert config_diff(kernels("[scaled_ws]"), kernels("scaled_ws")) == {}
    assert config_diff(kernels("[tanh_gelu, scaled_ws]"), kernels("scaled_ws+tanh_gelu")) == {}
    assert config_diff(kernels("true"), kernels("[scaled_ws, tanh_gelu]")) == {}
    assert config_diff(kernels("false"), kernels("[]")) == {}
    assert config_diff(kernels("scaled_ws"), kernels("tanh_gelu")) == {
        "train.native_kernels": ("scaled_ws", "tanh_gelu")
    }
    assert "train.native_kernels" in config_diff(kernels("null"), kernels("false"))


def test_resume_help_lists_every_key_a_resume_may_change(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from normfree.train.run_folder import RECOVERY_OVERRIDABLE, RESUME_OVERRIDABLE

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    resume = out[out.index("--resume RUN_DIR continue") : out.index("--overwrite let")]
    for key in RESUME_OVERRIDABLE + RECOVERY_OVERRIDABLE:
        if key != "out_dir":
            assert (key + "*" if key.endswith(".") else key) in resume, key


def test_a_key_given_twice_in_yaml_and_a_flag_with_its_key_are_refused(tmp_path, capsys) -> None:
    """Two ``optim:`` sections: PyYAML kept the second and dropped ``lr`` and ``clipping``
    silently. ``--data`` with ``data.spec=`` (or ``data=``), ``--out`` with ``out_dir=``,
    ``--compile`` with ``train.compile=``: the flag always won, whatever the order."""
    from normfree.cli import main

    dup = tmp_path / "dup.yaml"
    dup.write_text("optim:\n  lr: 0.1\n  clipping: 0.05\nschedule:\n  decay: linear\n"
                   "optim:\n  weight_decay: 5e-5\n")  # fmt: skip
    assert main(["train", "--config", str(dup), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "the key 'optim' is given twice (first at line 1) at line 6" in err
    assert err.count("\n") == 1
    for argv, flag in ((["--data", "digits", "data.spec=synthetic"], "--data and data.spec="),
                       (["data=synthetic", "--data", "digits"], "--data and data="),
                       (["-o", str(tmp_path / "a"), f"out_dir={tmp_path / 'b'}"], "--out and"),
                       (["train.compile=false", "--compile"], "--compile and")):  # fmt: skip
        assert main(["train", *argv, "--print-config"]) == 2
        err = capsys.readouterr().err
        assert flag in err and "give one" in err and err.count("\n") == 1
    assert main(["train", "--data", "digits", "train.epochs=1", "--print-config"]) == 0


@pytest.mark.parametrize(("model", "level"), [("nfnet_f0", (4, 5)), ("nfnet_f1", (4, 10)),
                                              ("nfnet_f3", (4, 15)), ("nfnet_f7", (4, 15))])
def test_the_nfnet_recipe_takes_each_variant_s_randaugment_level(model: str, level) -> None:
    """The recipe wrote F0's (4, 5) for every variant: ``model=nfnet_f3`` trained with F0's
    augmentation. ``data.randaugment: model`` reads the variant's official RA_level
    (DeepMind's experiment_nfnets.py: "405", "410", "415"...)."""
    from normfree.models import create_model
    from normfree.train.builders import randaugment_setting, weight_decay_setting

    cfg = resolve_config(recipe="nfnet_imagenet", overrides=[f"model={model}"])
    meta = create_model(model, depths=(1, 1, 1, 1), widths=(16, 16, 16, 16), group_size=8).meta
    assert randaugment_setting(cfg, meta) == level
    fixed = resolve_config(recipe="nfnet_imagenet", overrides=["data.randaugment=[2,9]"])
    assert randaugment_setting(fixed, meta) == (2, 9)
    regnet = create_model("nf_regnet_b0")
    wd = resolve_config(overrides=["model=nf_regnet_b0", "optim.weight_decay=model"])
    assert weight_decay_setting(wd, regnet) == 5e-5
    no_wd = resolve_config(overrides=["model=nfnet_f0", "optim.weight_decay=model"])
    with pytest.raises(ConfigError, match=r"'optim\.weight_decay' is model, but nfnet_f0 records"):
        weight_decay_setting(no_wd, create_model("nfnet_f0", depths=(1, 1, 1, 1)))
    with pytest.raises(ConfigError, match=r"'data\.randaugment' is model, but nf_resnet_cifar20"):
        randaugment_setting(resolve_config(overrides=["data.randaugment=model"]),
                            create_model("nf_resnet_cifar20").meta)


def test_small_cli_messages_and_the_default_run_folder_name(tmp_path, monkeypatch) -> None:
    """``--resume FILE`` says it is a file; an unknown recipe lists ``none`` too; a converted
    model in a subfolder names one run folder (``converted:sub/nf.safetensors`` made the
    nested folder ``runs/converted:sub/``)."""
    from normfree.train.run_folder import resume_config
    from normfree.train.trainer_state import default_run_dir

    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"notes\.txt': a file, not a run folder"):
        resume_config(afile, [])
    with pytest.raises(ConfigError, match=r"\(or none: the defaults alone\)"):
        resolve_config(recipe="cifr")
    with pytest.raises(ConfigError, match=r"'model_kwargs\.num_classes': the trainer takes"):
        resolve_config(overrides=["model_kwargs.num_classes=5"])  # (Python's "multiple values")
    cfg = resolve_config(overrides=["model=converted:sub/nf.safetensors"])
    run = default_run_dir(cfg, "digits", root=tmp_path / "runs")
    assert run.parent == tmp_path / "runs" and run.name.startswith("converted_sub_nf.safetensors-")
