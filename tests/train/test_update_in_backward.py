"""``optim.update_in_backward`` in ``normfree train``: the SGD or AdamW step of the Scaled-WS
conv weights inside their native backward (normfree.optim.update_in_backward) trains to the
same weights as the plain run, skips a non-finite step without touching them, resumes, and
each setting it cannot serve is a one-line config error."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from faults import CrashAfter, InjectedCrash, NaNAt

from normfree.nn import native
from normfree.optim import BackwardUpdate
from normfree.train import Config, ConfigError, train


@pytest.fixture(scope="module")
def kernels() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with native.native_kernels(True) as on:
            if not on:
                pytest.skip("no C++ compiler/OpenMP here: the native kernels cannot be built")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:  # float32, 10 steps: the two forms round differently in the last bits
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_a_run_equals_the_plain_run_and_skips_a_nonfinite_step(
    kernels, make_cfg: Callable[..., Config], random_run: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Every random stream of the short run (augmentation, MixUp/CutMix, dropout, stochastic
    depth), AGC and Nesterov SGD with weight decay: the final weights equal the plain run's,
    also with a NaN loss at step 3 skipped (the skipped step leaves the weights alone); every
    conv weight was updated in its backward at each of the 9 other steps."""
    applied: list[int] = []
    make_updater = BackwardUpdate._updater

    def counting(self, weight):  # counts the updates the backward applied
        update = make_updater(self, weight)

        def wrapped(*args):
            done, grad_gain = update(*args)
            applied.append(int(done))
            return done, grad_gain

        return wrapped

    monkeypatch.setattr(BackwardUpdate, "_updater", counting)
    common = [*random_run, "train.native_kernels=true", "train.skip_nonfinite=true"]
    runs = {}
    for fused in (False, True):
        cfg = make_cfg(*common, f"optim.update_in_backward={str(fused).lower()}", out=f"f{fused}")
        summary = train(cfg, callbacks=[NaNAt(3)])
        assert summary["status"] == "completed" and summary["skipped_steps"] == 1
        runs[fused] = _weights(Path(cfg.out_dir))
    convs = sum(t.dim() == 4 for t in runs[True].values())  # every conv is a Scaled-WS one
    assert convs > 0 and len(applied) == 9 * convs and all(applied)
    assert all(torch.isfinite(t).all() for t in runs[True].values())
    _assert_close(runs[False], runs[True])


def test_resume_keeps_the_momentum_buffers(
    kernels, make_cfg: Callable[..., Config], random_run: list[str]
) -> None:
    """A run resumed with the update in the backward switched on continues from the
    optimizer's momentum buffers as the uninterrupted plain run does."""
    common = [*random_run, "train.native_kernels=true"]
    whole = make_cfg(*common, out="whole")
    train(whole)
    crashed = make_cfg(*common, out="parts")
    with pytest.raises(InjectedCrash):
        train(crashed, callbacks=[CrashAfter(5)])  # last.pt holds step 4
    train(make_cfg(*common, "optim.update_in_backward=true", out="parts"), resume=crashed.out_dir)
    _assert_close(_weights(Path(whole.out_dir)), _weights(Path(crashed.out_dir)))


@pytest.mark.parametrize("fused_optimizer", [False, True])
def test_an_adamw_run_equals_the_plain_run(
    kernels, make_cfg: Callable[..., Config], random_run: list[str], fused_optimizer: bool
) -> None:
    """AdamW (decoupled weight decay, the trainer's AGC) with its step inside the backward
    trains to the plain run's weights and optimizer state (step counts, moments), with
    PyTorch's per-tensor and fused AdamW as the plain step."""
    common = [*random_run, "train.native_kernels=true", "optim.name=adamw", "optim.lr=0.001",
              "optim.weight_decay=0.05", f"optim.fused={str(fused_optimizer).lower()}"]  # fmt: skip
    states = {}
    for fused in (False, True):
        cfg = make_cfg(*common, f"optim.update_in_backward={str(fused).lower()}", out=f"a{fused}")
        assert train(cfg)["status"] == "completed"
        states[fused] = torch.load(Path(cfg.out_dir) / "last.pt", weights_only=True)
    _assert_close(states[False]["model"], states[True]["model"])
    plain, inbwd = (states[f]["optimizer"]["state"] for f in (False, True))
    assert plain.keys() == inbwd.keys()
    for k in plain:
        assert plain[k].keys() == inbwd[k].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert plain[k]["step"].dtype == inbwd[k]["step"].dtype  # (torch.equal ignores dtype)
        assert torch.equal(plain[k]["step"], inbwd[k]["step"])
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(inbwd[k][name], plain[k][name], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.name=rmsprop", "optim.name"),
        ("train.accum_steps=2", "train.accum_steps"),
        ("train.precision=fp16", "train.precision"),
        ("optim.clip_grad_norm=1.0", "optim.clip_grad_norm"),
        ("optim.msr=true", "optim.msr"),
        ("train.native_kernels=false", "train.native_kernels"),
    ],
)
def test_what_it_cannot_serve_is_a_config_error(
    make_cfg: Callable[..., Config], override: str, key: str
) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}' must be .* with optim\.update_in_backward"):
        make_cfg("optim.update_in_backward=true", override)


def test_a_model_without_scaled_ws_convs_names_the_fix(make_cfg: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match=r"set optim\.update_in_backward=false: "
                       r"bn_resnet_cifar20 has no Scaled-WS convolutions"):  # fmt: skip
        train(make_cfg("model=bn_resnet_cifar20", "optim.update_in_backward=true"))


@pytest.mark.parametrize(
    ("env", "choice", "built", "said"),
    [
        ("1", None, True, None),  # switched on by the environment, built lazily: no warning
        ("", "true", True, None),
        ("", "true", False, "could not be built"),  # the build failed
        ("scaled_ws", None, False, "could not be built"),
        ("", None, False, "are off (set train.native_kernels=true"),  # not asked for
        ("tanh_gelu", None, False, "are off (set train.native_kernels=true"),
    ],
)
def test_the_update_in_backward_warning_says_what_happens(
    env: str, choice: str | None, built: bool, said: str | None,
    make_cfg: Callable[..., Config], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Whether the Scaled-WS kernels will run is decided after the extension is resolved
    (NORMFREE_NATIVE_KERNELS builds it lazily); a failed build is named as such, not as an
    option to set."""
    import contextlib
    import logging

    import normfree.train.loop as loop

    @contextlib.contextmanager
    def kernels_chosen(value):  # the build's outcome, without building
        yield built

    monkeypatch.setenv("NORMFREE_NATIVE_KERNELS", env)
    monkeypatch.setattr(loop, "native_kernels", kernels_chosen)
    monkeypatch.setattr(loop, "native_extension", lambda kernel: object() if built else None)
    overrides = ["train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=16",
                 "optim.update_in_backward=true"]  # fmt: skip
    if choice is not None:
        overrides.append(f"train.native_kernels={choice}")
    with caplog.at_level(logging.WARNING, logger="normfree"):
        train(make_cfg(*overrides))
    warned = [m for m in (r.getMessage() for r in caplog.records)
              if m.startswith("optim.update_in_backward:")]  # fmt: skip
    if said is None:
        assert warned == []
    else:
        assert len(warned) == 1 and said in warned[0], warned
        if "could not be built" in said:
            assert "set train.native_kernels" not in warned[0]
