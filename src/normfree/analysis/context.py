"""Running a model for analysis without changing it.

:func:`analysis_mode` puts a model in the mode an analysis needs and restores it exactly
afterwards, even when the forward pass raises: every module's ``training`` flag, every buffer
(BatchNorm running statistics are updated by a train-mode forward), the random number generator
state of the CPU and of the model's GPU (functional dropout such as timm's heads draws from it
in train mode) and, on request, SkipInit gains set to 1. :func:`make_inputs` builds the seeded
Gaussian-noise batch of Signal Propagation Plots (Brock et al. 2021a, §3: unit-Gaussian inputs at
initialisation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from normfree.nn.msr import ChannelNoise
from normfree.nn.residual import SkipInitGain, StochasticDepth

__all__ = [
    "ANALYSIS_MODES",
    "STOCHASTIC_CLASS_NAMES",
    "analysis_mode",
    "default_input_shape",
    "make_inputs",
    "model_device",
    "model_label",
]

ANALYSIS_MODES = ("train", "eval")
# Modules that inject randomness in train mode (dropout, stochastic depth, MSR's channel noise);
# analysis runs them in eval mode (identity).
STOCHASTIC_CLASS_NAMES: frozenset[str] = frozenset(
    {"DropPath", "StochasticDepth", "DropBlock", "DropBlock2d"}
)
_STOCHASTIC_TYPES = (nn.modules.dropout._DropoutNd, nn.RReLU, StochasticDepth, ChannelNoise)


def _is_stochastic(module: nn.Module) -> bool:
    return isinstance(module, _STOCHASTIC_TYPES) or type(module).__name__ in STOCHASTIC_CLASS_NAMES


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


@contextmanager
def analysis_mode(
    model: nn.Module, mode: str = "train", skip_gains_to_one: bool = False
) -> Iterator[nn.Module]:
    """Context in which ``model`` runs for analysis; everything is restored on exit.

    Args:
        model: any module.
        mode: ``"train"`` (normalization layers use batch statistics, as in the paper's SPPs of
            BN networks) or ``"eval"``. Dropout and stochastic-depth modules always run in eval
            mode so the measurement is deterministic (see below).
        skip_gains_to_one: set every :class:`normfree.nn.SkipInitGain` to 1 (with the default
            zero gains every block outputs its shortcut and the plots are flat).

    Dropout, RReLU and stochastic-depth modules always run in eval mode; randomness the model
    draws otherwise (``F.dropout(x, training=self.training)``) comes from the generators whose
    state is restored on exit.
    """
    if mode not in ANALYSIS_MODES:
        raise ValueError(f"mode must be one of {ANALYSIS_MODES}, got {mode!r}")
    device = model_device(model)
    cpu_rng = torch.get_rng_state()
    gpu_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    flags = [(m, m.training) for m in model.modules()]
    buffers = []
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                buffers.append((module, name, buf, buf.detach().clone()))
    gains = []
    try:
        model.train(mode == "train")
        for module in model.modules():
            if _is_stochastic(module):
                module.eval()
        if skip_gains_to_one:
            for module in model.modules():
                if isinstance(module, SkipInitGain):
                    gains.append((module, module.gain, module.gain.detach().clone()))
                    with torch.no_grad():
                        module.gain.fill_(1.0)
        yield model
    finally:
        with torch.no_grad():
            for module, param, saved in gains:
                module._parameters["gain"] = param
                param.copy_(saved)
            for module, name, buf, saved in buffers:
                module._buffers[name] = buf
                buf.copy_(saved)
        for module, training in flags:
            module.training = training
        torch.set_rng_state(cpu_rng)
        if gpu_rng is not None:
            torch.cuda.set_rng_state(gpu_rng, device)


def model_label(model: nn.Module) -> str:
    """A model's display name: ``meta.name`` for normfree models, else the class name."""
    meta = getattr(model, "meta", None)
    return str(getattr(meta, "name", None) or type(model).__name__)


def default_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """``(in_chans, size, size)`` for a normfree model (``meta.test_size``), else ``None``."""
    meta = getattr(model, "meta", None)
    in_chans = getattr(model, "in_chans", None)
    size = getattr(meta, "test_size", None)
    if isinstance(in_chans, int) and isinstance(size, int):
        return (in_chans, size, size)
    return None


def make_inputs(
    model: nn.Module,
    inputs: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, str]:
    """The analysis batch and a word for it (``"data"`` or ``"gaussian"``).

    ``inputs`` (a real batch) wins, moved to the model's device (a floating-point batch also to
    the model's floating dtype); otherwise a seeded unit-Gaussian batch of shape
    ``(batch_size, *input_shape)`` is drawn on the CPU (the same numbers on every device) and
    moved to the model's device in the model's dtype (``device``, if given, must name the device
    the model is on). ``input_shape`` is the shape of *one* example, e.g. ``(3, 32, 32)``; for a
    normfree model it defaults to ``(in_chans, meta.test_size, meta.test_size)``.
    """
    dev = model_device(model)
    if device is not None:
        want = torch.device(device)
        if want.type != dev.type or (want.index is not None and dev.index is not None
                                     and want.index != dev.index):  # fmt: skip
            raise ValueError(f"model is on {dev} but device={device!r}; move the model first")
        dev = want if want.index is not None else dev
    if inputs is not None:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
        if input_shape is not None and tuple(input_shape) != tuple(inputs.shape[1:]):
            raise ValueError(
                f"inputs of shape {tuple(inputs.shape)} and input_shape={tuple(input_shape)} "
                "disagree; give one of them"
            )
        if inputs.dim() < 1 or inputs.shape[0] < 1:
            raise ValueError(f"inputs must be a non-empty batch, got shape {tuple(inputs.shape)}")
        if inputs.is_floating_point():  # a float32 batch of images for a float64 model
            return inputs.to(device=dev, dtype=_model_dtype(model)), "data"
        return inputs.to(dev), "data"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    shape = tuple(input_shape) if input_shape is not None else default_input_shape(model)
    if shape is None:
        raise ValueError(
            f"pass inputs=<batch> or input_shape=(C, H, W) for {type(model).__name__} "
            "(only normfree models know their input size)"
        )
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive ints (one example), got {shape!r}")
    if math.prod((batch_size, *shape)) * 8 >= 2**63:  # torch's byte count would overflow
        raise ValueError(
            f"an input batch of {batch_size}×{'×'.join(map(str, shape))} values is too large "
            "to allocate; choose a smaller image size or batch"
        )
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((batch_size, *shape), generator=gen)
    return x.to(device=dev, dtype=_model_dtype(model)), "gaussian"
