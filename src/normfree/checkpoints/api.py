"""One entry point to load weights from any supported source into a normfree model."""

from __future__ import annotations

import os
import typing
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from normfree.checkpoints.deepmind import deepmind_to_normfree, read_haiku_file
from normfree.checkpoints.errors import CheckpointError
from normfree.checkpoints.io import (
    atomic_save,
    load_tensors,
    missing_file_message,
    save_safetensors,
)
from normfree.checkpoints.state_dict import LoadReport, load_state_dict_checked
from normfree.checkpoints.timm import is_timm_state_dict, timm_to_normfree
from normfree.nn.wrappers import strip_wrapper_prefixes, unwrap_model

__all__ = ["CheckpointFormat", "adapt_input_conv", "load_pretrained", "save_model"]

CheckpointFormat = Literal["auto", "normfree", "timm", "deepmind", "state_dict"]
MODEL_FILE_FORMAT = "normfree.model"


def save_model(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save a model's weights atomically: ``.safetensors`` (tensors + model name in the metadata)
    or a torch file readable with ``weights_only=True``. A DDP or ``torch.compile`` wrapper is
    looked through (:func:`normfree.nn.unwrap_model`): the file has the model's own keys."""
    model = unwrap_model(model)
    meta = getattr(model, "meta", None)
    name = meta.name if meta is not None else type(model).__name__
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if Path(path).suffix == ".safetensors":
        save_safetensors(state, path, metadata={"format": MODEL_FILE_FORMAT, "model_name": name})
    else:
        atomic_save({"format": MODEL_FILE_FORMAT, "version": 1, "model_name": name,
                     "state_dict": state}, path)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first conv's weight ``(out, 3, kh, kw)``, trained on RGB, for ``in_chans`` input
    channels, by timm's rule (``timm.models.adapt_input_conv``, which ``pretrained=True`` applies
    when ``in_chans != 3``): one channel gets the sum of the three; more get the three repeated
    in turn and scaled by ``3/in_chans``. For one channel, or a multiple of three, an input
    with the same value in every channel then gives the plain conv's pre-activation on the
    gray image. For a Scaled-WS conv (every normfree stem) the standardization renormalises
    each unit of the new weight, as it does in timm's NF ports."""
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected a conv weight with 3 input channels, got {tuple(weight.shape)}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be an int >= 1, got {in_chans!r}")
    work = weight if weight.dtype == torch.float64 else weight.float()  # sums of half floats
    if in_chans == 1:
        adapted = work.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_chans // 3)
        adapted = work.repeat(1, repeats, 1, 1)[:, :in_chans] * (3 / in_chans)
    return adapted.to(weight.dtype)


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _extract_state_dict(obj: Any, use_ema: bool, path: object) -> Mapping[str, torch.Tensor]:
    """normfree model files, normfree training checkpoints (``model`` / ``ema``) or plain state
    dicts (``state_dict`` / ``model`` wrappers as other tools write them; timm's ``train.py``
    keeps its EMA as ``state_dict_ema``)."""
    if _is_tensor_mapping(obj):
        if use_ema:
            raise CheckpointError(
                f"{path} has no EMA weights (it is one bare state dict): load it with "
                "use_ema=False, or give the training checkpoint that holds the EMA"
            )
        return obj
    if isinstance(obj, Mapping):
        keys = ("ema", "state_dict_ema") if use_ema else ("state_dict", "model", "model_state")
        for key in keys:
            value = obj.get(key)
            for inner in ("state_dict", "module"):  # {"ema": {"module": ...}} etc.
                if isinstance(value, Mapping) and inner in value:
                    value = value[inner]
            if _is_tensor_mapping(value):
                return value
        if use_ema:
            raise CheckpointError(
                f"{path} has no EMA weights (keys: {sorted(obj)}; a run with ema.enabled=false "
                "keeps none): load its raw weights instead (use_ema=False; in a training config, "
                "init_use_ema=false)"
            )
    raise CheckpointError(f"{path} holds no recognisable state dict (got {type(obj).__name__})")


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike[str] | Mapping[str, Any],
    *,
    format: CheckpointFormat = "auto",
    strict: bool = True,
    use_ema: bool = False,
    trust_pickle: bool = False,
    exclude: Collection[str] = (),
    adapt_first_conv: str | None = None,
) -> LoadReport:
    """Load weights into ``model`` from a file.

    Supported (``format="auto"`` detects them):

    * normfree model files (:func:`save_model`) and training checkpoints (``last.pt``,
      ``best.pt``; ``use_ema=True`` takes the EMA weights);
    * timm state dicts of its ``dm_nfnet_f*`` ports (renamed, gains reshaped);
    * DeepMind's official ``F*_haiku.npz`` NFNet files, which are pickles: they load only with
      ``trust_pickle=True`` (see :func:`normfree.checkpoints.read_haiku_file`);
    * ``.safetensors`` files and plain state dicts;
    * a state dict (or a checkpoint dict) already in memory, given as ``path``: it goes through
      the same steps as a file's (``create_model``'s ``pretrained_cfg=dict(state_dict=...)``).

    Keys saved from a DDP or ``torch.compile`` wrapper (``module.``, ``_orig_mod.``) are read as
    the model's own, and a wrapped ``model`` is loaded through its wrapper
    (:func:`normfree.nn.unwrap_model`).

    A mismatched checkpoint raises :class:`CheckpointMismatchError` listing missing, unexpected
    and mis-shaped parameters and loads nothing, unless ``strict=False``. Names in ``exclude``
    (state-dict keys of ``model``, e.g. ``model.classifier_parameter_names()`` to fine-tune on
    other classes) are neither loaded nor compared: the model keeps its own.
    ``adapt_first_conv`` names the state-dict key of the first conv's weight: where the file's
    has 3 input channels and the model's another number, it is adapted by
    :func:`adapt_input_conv` (``create_model(pretrained=True, in_chans=1)`` passes it, as timm).
    """
    if format not in typing.get_args(CheckpointFormat):
        raise ValueError(
            f"format must be one of {', '.join(typing.get_args(CheckpointFormat))}, got {format!r}"
        )
    model = unwrap_model(model)
    kind: str = format
    if isinstance(path, Mapping):
        if format == "deepmind":
            raise ValueError("format='deepmind' reads a file: pass its path")
        source, raw = "the given state dict", path
    else:
        file = Path(path)
        source = str(file)
        kind = _detect(file) if format == "auto" else format
        if kind == "deepmind":
            tree = read_haiku_file(file, trust_pickle=trust_pickle)
        else:
            raw = load_tensors(file)
    if kind == "deepmind":
        state = deepmind_to_normfree(tree, model)
    else:
        state = strip_wrapper_prefixes(
            _extract_state_dict(raw, use_ema, source), model.state_dict().keys()
        )
        if kind == "timm" or (kind in ("auto", "auto_torch") and is_timm_state_dict(state)):
            state = timm_to_normfree(state)
    if adapt_first_conv is not None:
        _adapt_first_conv(model, state, adapt_first_conv)
    return load_state_dict_checked(
        model, state, strict=strict, source=source, exclude=frozenset(exclude)
    )


def _adapt_first_conv(model: nn.Module, state: dict[str, torch.Tensor], key: str) -> None:
    """Adapt ``state[key]`` in place to the model's input channels (:func:`adapt_input_conv`)
    where the file's has 3 and the model's another count; anything else is left to the
    load's own shape check."""
    own = model.state_dict().get(key)
    theirs = state.get(key)
    if own is None or theirs is None or own.dim() != 4 or theirs.dim() != 4:
        return
    if theirs.shape[1] == 3 and own.shape[1] != 3 and own.shape[0] == theirs.shape[0]:
        state[key] = adapt_input_conv(theirs, int(own.shape[1]))


def _detect(path: Path) -> str:
    if not path.is_file():
        raise CheckpointError(missing_file_message(path))
    if path.suffix == ".safetensors":
        return "auto_torch"
    if path.suffix in (".npz", ".pkl", ".pickle", ".dill"):
        # a real zip .npz may also be a flat Haiku export; both go through the DeepMind reader
        return "deepmind" if not zipfile.is_zipfile(path) or _is_npz(path) else "auto_torch"
    return "auto_torch"


def _is_npz(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith(".npy") for n in z.namelist())
