"""Knowledge distillation (normfree.train.distill): the loss against its closed form, and a
trainer wired to a teacher (a run folder, or a model spec + weights file)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from normfree.models import create_model
from normfree.train import Callback, train
from normfree.train.config import ConfigError
from normfree.train.distill import distillation_loss

pytest.importorskip("sklearn")

PLAIN = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.drop_rate=0",
         "train.stochdepth_rate=0", "train.label_smoothing=0", "ema.enabled=false"]  # fmt: skip


def test_distillation_loss_is_t_squared_kl() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for temp in (1.0, 4.0):
        p = torch.softmax(t / temp, 1)
        q = torch.softmax(s / temp, 1)
        reference = temp**2 * (p * (p.log() - q.log())).sum(1).mean()
        assert math.isclose(distillation_loss(s, t, temp).item(), reference.item(), rel_tol=1e-6)
    assert distillation_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)


class _FirstLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_loss(self, trainer, step, loss):  # type: ignore[no-untyped-def]
        self.losses.append(float(loss.detach()))
        return loss


def test_student_equal_to_its_teacher_has_zero_soft_loss(tmp_path: Path, make_cfg) -> None:
    teacher_run = tmp_path / "teacher"
    train(make_cfg(*PLAIN, out="teacher"))
    # the student starts from the teacher's weights: pure distillation loss is 0 at step 1
    same = _FirstLosses()
    train(make_cfg(*PLAIN, f"init_from={teacher_run}", f"distill.teacher={teacher_run}",
                   "distill.weight=1.0", out="same"), callbacks=[same])  # fmt: skip
    assert abs(same.losses[0]) < 1e-5
    # a fresh student disagrees with the teacher: a positive soft loss, and w mixes it with CE
    fresh = _FirstLosses()
    train(make_cfg(*PLAIN, "seed=1", f"distill.teacher={teacher_run}", "distill.weight=1.0",
                   out="fresh"), callbacks=[fresh])  # fmt: skip
    assert fresh.losses[0] > 1e-3


def test_teacher_from_a_model_spec_and_weights(tmp_path: Path, make_cfg) -> None:
    from normfree.checkpoints import save_model

    teacher = create_model("nf_resnet_cifar20", num_classes=10, in_chans=1)
    weights = tmp_path / "teacher.safetensors"
    save_model(teacher, weights)
    spec = [
        "distill.teacher=nf_resnet_cifar20",
        f"distill.teacher_weights={weights}",
        "distill.teacher_kwargs={num_classes: 10, in_chans: 1}",
        "distill.weight=1.0",
    ]
    same = _FirstLosses()
    train(make_cfg(*PLAIN, f"init_from={weights}", *spec, out="spec"), callbacks=[same])
    assert abs(same.losses[0]) < 1e-5
    with pytest.raises(ConfigError, match=r"distill\.teacher_weights"):
        train(make_cfg(*PLAIN, "distill.teacher=nf_resnet_cifar20", out="noweights"))
    with pytest.raises(ConfigError, match=r"distill\.weight"):
        make_cfg("distill.weight=1.5")
