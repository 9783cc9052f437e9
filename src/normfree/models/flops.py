"""Parameter and multiply-accumulate (MAC) counts, as the NFNet papers report them.

:func:`count_flops` counts the MACs of every convolution and linear layer for one image, the
way DeepMind's ``count_flops`` methods produce the published tables (Brock et al. 2021b, Table 2
and ``nfnets/README.md``; Brock et al. 2021a, NF-RegNet table): squeeze-excite layers and the
classifier are included; activations, pooling, additions and biases are not. A conv costs
``(C_in/groups)·kh·kw·C_out`` MACs per output position.

Two conventions for the number of output positions:

* ``"official"`` (default): the official ``base.count_conv_flops`` uses ``H_in·W_in/(s_h·s_w)``
  with real-valued sizes that are halved at every stride-2 layer, so a 17×17 map entering a
  stride-2 conv counts as 8.5×8.5 (NF-RegNet B2 at 272 px, B5, B6, B7). Layers on globally pooled
  maps (1×1, e.g. squeeze-excite) count one position.
* ``"actual"``: the output positions the layer really computes (``ceil`` for "SAME" padding).

Both run the model once on the ``meta`` device (shapes only: no memory, no arithmetic), with
forward hooks on every ``nn.Conv1d/2d/3d`` and ``nn.Linear``; a model whose parameters live
elsewhere is run through :func:`torch.func.functional_call` with meta stand-ins, so its weights
are neither copied nor touched. For ``"official"`` the probe image is ``256×`` larger than asked
(free on meta) so that every spatial size stays an exact multiple of the strides; a layer's
nominal input size is then its probe size / 256, which is the official real-valued size exactly
when the network's strides are powers of two and its total stride is at most 256. A spatial axis
of extent 1 at the probe size is a pooled axis and counts once; a linear layer applied to more
than one row per image (tokens) is scaled like a 2-D spatial map.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from normfree.nn.residual import plain_forward

__all__ = ["count_flops", "count_params"]

_PROBE_SCALE = 256  # official convention: probe at 256× the size (total stride ≤ 256, powers of 2)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (shared parameters once), as the papers count them: WS gains
    and biases and SkipInit scalars included, buffers excluded. Works on the meta device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_params needs an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _image_size(image_size: int | Iterable[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size
    ):
        raise ValueError(f"image_size must be a positive int or an (H, W) pair, got {image_size!r}")
    return size[0], size[1]


def _infer_in_chans(model: nn.Module) -> int:
    in_chans = getattr(model, "in_chans", None)
    if isinstance(in_chans, int):
        return in_chans
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError("cannot infer the number of input channels: pass in_chans")


def _positions(extents: Iterable[int], strides: Iterable[int], official: bool) -> float:
    """Output positions of a layer with the given input extents (at the probe size)."""
    total = 1.0
    for extent, stride in zip(extents, strides):
        if extent == 1:  # a pooled axis: one position whatever the image size
            continue
        total *= extent / (_PROBE_SCALE * stride) if official else extent
    return total


def count_flops(
    model: nn.Module,
    image_size: int | tuple[int, int],
    in_chans: int | None = None,
    convention: Literal["official", "actual"] = "official",
) -> int:
    """Multiply-accumulates of one forward pass on one ``image_size`` image (see module doc).

    Args:
        model: any module whose forward takes an ``(N, C, H, W)`` batch.
        image_size: ``H = W`` or an ``(H, W)`` pair.
        in_chans: input channels (default ``model.in_chans`` or the first conv's inputs).
        convention: ``"official"`` (real-valued sizes halved per stride, as the NFNet /
            NF-RegNet tables) or ``"actual"`` (the positions really computed).

    Returns:
        The MAC count, rounded to the nearest integer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_flops needs an nn.Module, got {type(model).__name__}")
    if convention not in ("official", "actual"):
        raise ValueError(f"convention must be 'official' or 'actual', got {convention!r}")
    official = convention == "official"
    h, w = _image_size(image_size)
    channels = _infer_in_chans(model) if in_chans is None else in_chans
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"in_chans must be a positive int, got {channels!r}")
    scale = _PROBE_SCALE if official else 1
    batch = 1
    total = 0.0

    def conv_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        x = inputs[0]
        if official:
            positions = _positions(x.shape[2:], module.stride, official=True)
        else:
            positions = _positions(output.shape[2:], [1] * (output.dim() - 2), official=False)
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        per_position = module.in_channels // module.groups * kernel * module.out_channels
        total += per_position * positions

    def linear_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        rows = inputs[0].numel() // module.in_features // batch
        if official and rows > 1:
            rows = rows / scale**2
        total += module.in_features * module.out_features * rows

    hooks = []
    for module in model.modules():
        if isinstance(module, _CONVS):
            hooks.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear_hook))
    modes = {m: m.training for m in model.modules()}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    on_meta = all(t.is_meta for t in tensors.values())
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    if not dtype.is_floating_point:
        dtype = torch.float32
    x = torch.empty(batch, channels, h * scale, w * scale, device="meta", dtype=dtype)
    try:
        model.eval()
        with torch.no_grad(), plain_forward(model):  # folded NF blocks bypass the conv hooks
            if on_meta:
                model(x)
            else:
                stand_ins = {
                    name: torch.empty_like(t, device="meta") for name, t in tensors.items()
                }
                functional_call(model, stand_ins, (x,), strict=False, tie_weights=True)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
        if not on_meta:
            for module in model.modules():  # drop weight caches built from the meta stand-ins
                clear = getattr(module, "clear_weight_cache", None)
                if callable(clear):
                    clear()
    return round(total)
