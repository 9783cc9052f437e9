"""Knowledge distillation from a frozen teacher (Hinton, Vinyals & Dean 2015, arXiv 1503.02531).

The loss of a distilled step is ``(1 − w)·CE(student, target) + w·T²·KL(p_T ‖ q_T)`` with
``p_T = softmax(teacher/T)``, ``q_T = softmax(student/T)`` (eq. 2 of the paper: the ``T²`` keeps
the soft term's gradient scale independent of ``T``). Its use here is fine-tuning a model made by
``normfree convert`` with the original BatchNorm network as the teacher (docs/convert.md): the
teacher runs in eval mode on the same (augmented, mixed) batch, so it is batch independent too.

A teacher is ``distill.teacher``:

* a normfree run folder or training checkpoint (its ``best.pt``; raw weights), or
* a model spec that ``normfree convert`` reads (``torchvision:NAME``, ``timm:NAME``, a normfree
  name, ``package.module:factory``) with its weights in ``distill.teacher_weights``
  (``.safetensors`` or a ``torch.save`` state dict, read with ``weights_only=True``) and its
  constructor arguments in ``distill.teacher_kwargs`` (e.g. ``{num_classes: 10}``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from normfree.console import first_line
from normfree.train.config import Config, ConfigError

__all__ = ["check_teacher_fits", "distillation_loss", "load_teacher"]


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch."""
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (t * t)


@torch.no_grad()
def check_teacher_fits(teacher: nn.Module, image: torch.Tensor, num_classes: int) -> None:
    """One of the data's images through the teacher, before the run starts: it must take the
    images and give one logit per class (:class:`ConfigError` naming what does not fit)."""
    device = next(teacher.parameters(), torch.empty(0)).device
    size = "×".join(str(s) for s in image.shape)
    try:
        out = teacher(image[None].to(device))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(
            f"distill.teacher does not take this data's {size} images ({first_line(e)}); "
            "distil from a teacher trained on this kind of image"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
        got = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"distill.teacher gives {got} outputs per image but the data has {num_classes} "
            "classes; distil from a teacher trained on this label set"
        )


def load_teacher(cfg: Config, device: torch.device) -> nn.Module:
    """The frozen teacher named by ``cfg.distill`` (see the module docstring), in eval mode."""
    d = cfg.distill
    assert d.teacher is not None
    path = Path(d.teacher)
    if path.is_dir() or (path.is_file() and d.teacher_weights is None):
        from normfree.train.checkpointing import checkpoint_model, load_checkpoint
        from normfree.train.evaluate import resolve_checkpoint_path

        resolved = resolve_checkpoint_path(path)
        teacher = checkpoint_model(load_checkpoint(resolved), resolved)
    else:
        if d.teacher_weights is None:
            raise ConfigError(
                f"distill.teacher={d.teacher!r} is a model spec: give its weights with "
                "distill.teacher_weights=FILE (.safetensors or a state-dict .pt)"
            )
        from normfree.checkpoints import load_pretrained
        from normfree.convert import ConversionError
        from normfree.convert.sources import build_source, check_file_source

        # a config (or a resumed checkpoint's) is a file too: no code it names runs unasked
        check_file_source(d.teacher, d.teacher_kwargs, "distill.teacher")
        try:
            teacher = build_source(d.teacher, d.teacher_kwargs)
        except ConversionError as e:
            raise ConfigError(f"distill.teacher: {e}") from None
        own = d.teacher.startswith("normfree:") or ":" not in d.teacher
        load_pretrained(teacher, d.teacher_weights, format="auto" if own else "state_dict")
    teacher.eval().requires_grad_(False)
    return teacher.to(device)
