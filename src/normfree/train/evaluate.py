"""Evaluation: top-1/top-5 accuracy and cross-entropy of raw and EMA weights.

:func:`evaluate` runs one model over a loader (sharded over ranks, sums all-reduced);
:func:`evaluate_checkpoint` rebuilds the model of a training checkpoint and reports both the raw
and the EMA weights, as the NFNet code does (``ema_`` metrics, Brock et al. 2021b, App. C).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from normfree.train.distributed import DistInfo, all_reduce_sum

__all__ = [
    "autocast_context",
    "evaluate",
    "evaluate_checkpoint",
    "resolve_checkpoint_path",
    "target_rank",
]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``bf16``/``fp16``; a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def target_rank(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The 0-based rank of each example's true class among its logits, ties going to the lower
    class index (as ``argmax`` breaks them): the number of classes scoring higher, plus those
    scoring the same with a lower index. Top-k accuracy counts ``rank < k``. ``topk``'s order
    among equal logits is unspecified (it differs between devices and class counts: zero
    logits put class 8 first of 10 on CPU), and equal logits are common (a zero-initialised
    classifier, bf16 logits), so top-1/top-5 are defined through this rank instead. A row with
    a NaN logit gets the largest int64 (a miss for every k)."""
    target = target.long()
    t = logits.gather(1, target[:, None])
    classes = torch.arange(logits.shape[1], device=logits.device)
    ahead = (logits > t) | ((logits == t) & (classes[None, :] < target[:, None]))
    rank = ahead.sum(dim=1)
    return rank.masked_fill(logits.isnan().any(dim=1), torch.iinfo(rank.dtype).max)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    info: DistInfo | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy (no label smoothing) of
    ``model`` on ``loader``; with ``info`` the per-rank sums are all-reduced.

    Top-k counts an example when its true class ranks below ``k`` (:func:`target_rank`: ties
    go to the lower class index, as ``argmax``); top-5 of fewer than 5 classes is 100%.
    Returns ``{"top1", "top5", "loss", "count"}``.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, precision):
            logits = model(x)
        logits = logits.float()
        rank = target_rank(logits, y)
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[1] += (rank < 1).sum()
        sums[2] += (rank < 5).sum()
        sums[3] += y.numel()
    model.train(was_training)
    if info is not None:
        all_reduce_sum(sums, info)
    loss, c1, c5, n = sums.tolist()
    if n == 0:
        raise ValueError("evaluation loader is empty")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "count": int(n)}


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its ``best.pt``, else ``last.pt``)."""
    from normfree.train.checkpointing import CheckpointError

    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"run folder {str(p)!r} holds no best.pt or last.pt")
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {str(p)!r}")
    return p


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | None = None,
    *,
    image_size: int | None = None,
    test_size: int | None = None,
    batch_size: int | None = None,
    split: str = "val",
    device: str = "auto",
    workers: int = 0,
    precision: str | None = None,
) -> dict[str, Any]:
    """Evaluate the raw and EMA weights of a training checkpoint.

    Args:
        checkpoint: a ``.pt`` written by ``normfree train`` or a run folder.
        data: dataset spec (default: the run's). The held-out split is rebuilt with the run's
            seed and ``val_fraction``, so digits/CIFAR-style splits match training.
        image_size / test_size: resolution overrides (default: the run's config; when that is
            unset, the dataset's own size, or the model's ``meta.test_size`` for image folders).
        batch_size: evaluation batch (default: the run's eval/training batch, at most 512).
        split: ``"val"`` (held out) or ``"train"`` (the training images without augmentation).

    Returns:
        ``{"checkpoint", "data", "split", "count", "raw": {...}, "ema": {...} | None,
        "epoch", "step"}`` with ``top1``/``top5`` in percent and ``loss``.
    """
    from normfree.train.builders import build_data, build_model, check_input_size
    from normfree.train.checkpointing import (
        check_weights_fit,
        checkpoint_config,
        checkpoint_weights,
        load_checkpoint,
    )
    from normfree.train.distributed import select_device

    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    for name, value in (("batch size", batch_size), ("image size", image_size),
                        ("test size", test_size), ("workers", workers)):  # fmt: skip
        if value is not None and value < (0 if name == "workers" else 1):
            what = "a non-negative" if name == "workers" else "a positive"
            raise ValueError(f"--{name.replace(' ', '-')} must be {what} number, got {value}")
    dev = select_device(device, what="--device")
    path = resolve_checkpoint_path(checkpoint)
    state = load_checkpoint(path)
    cfg = checkpoint_config(state, path)
    if data is not None:
        cfg.data.spec = data
    if image_size is not None:
        cfg.data.image_size = image_size
    args = state["model_args"]
    check_weights_fit(args, checkpoint_weights(state), path)
    if state.get("ema"):
        check_weights_fit(args, checkpoint_weights(state, ema=True), path)
    model = build_model(args)
    bundle = build_data(cfg, test_size=test_size, train_augment=False, meta=model.meta)
    if bundle.num_classes != args["num_classes"] or bundle.in_chans != args["in_chans"]:
        raise ValueError(
            f"dataset {cfg.data.spec!r} has {bundle.num_classes} classes × {bundle.in_chans} "
            f"channels but the checkpoint's model was built for {args['num_classes']} × "
            f"{args['in_chans']}"
        )
    dataset = bundle.val if split == "val" else bundle.train
    check_input_size(model, getattr(bundle, "test_size", None), "--test-size")
    bs = batch_size or cfg.data.eval_batch_size or min(cfg.train.batch_size, 512)
    loader = DataLoader(dataset, batch_size=bs, shuffle=False, num_workers=workers)
    prec = precision or cfg.train.precision
    model.load_state_dict(checkpoint_weights(state))
    model.to(dev)
    result: dict[str, Any] = {
        "checkpoint": str(path),
        "model": args["name"],
        "data": cfg.data.spec,
        "split": split,
        "test_size": getattr(bundle, "test_size", None),
        "epoch": state["position"].get("epoch"),
        "step": state["position"].get("global_step"),
        "raw": evaluate(model, loader, dev, precision=prec),
        "ema": None,
    }
    result["count"] = result["raw"]["count"]
    if state.get("ema"):
        model.load_state_dict(checkpoint_weights(state, ema=True))
        result["ema"] = evaluate(model, loader, dev, precision=prec)
    return result
