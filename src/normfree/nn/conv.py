"""Plain convolutions shared by several model families.

:class:`HeConv2d` is a convolution with He-normal init (He et al. 2015, "Delving Deep into
Rectifiers", arXiv 1502.01852: eq. 10 for ``fan_in``, eq. 14 for ``fan_out``), symmetric ``k//2``
padding and an optional bias: the "NF, He-init" convs of Brock et al. 2021a, the convs of the
normalized ResNet baselines, Fixup, MSR and EfficientNet. Its 1×1 convs run in the faster CPU
forms of :mod:`normfree.nn.pointwise_conv`.

:func:`grouped_width` is the width rule of the grouped 3×3 convs of NFNets and NF-RegNets
(DeepMind ``nfnets/nfnet.py`` ``NFBlock`` and ``nf_regnet.py`` ``NFBlock``).

The faster CPU forms of 1×1 convolutions (pooled, spatial and strided inputs; training and
evaluation) are in :mod:`normfree.nn.pointwise_conv`.
"""

from __future__ import annotations

from torch import nn

from normfree.nn.pointwise_conv import _PointwiseForms

__all__ = ["HeConv2d", "grouped_width"]

_MODES = ("fan_in", "fan_out")


class HeConv2d(_PointwiseForms, nn.Conv2d):
    """Plain 2-D convolution with He-normal init: ``W ~ N(0, 2/fan)`` with ``fan`` the fan-in
    ``C_in/groups·k²`` (``mode="fan_in"``) or the fan-out ``C_out·k²`` (``mode="fan_out"``,
    torchvision's ResNet and Fixup's rule); zero bias. Padding ``k//2`` (symmetric).

    Args:
        bias: add a learnable per-channel bias (initialised to 0).
        mode: ``"fan_in"`` or ``"fan_out"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        mode: str = "fan_in",
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        self.mode = mode  # read by reset_parameters, which nn.Conv2d.__init__ calls
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
            groups=groups, bias=bias,
        )  # fmt: skip

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode=self.mode, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}"


def grouped_width(channels: int, ratio: float, group_size: int) -> tuple[int, int]:
    """``(width, groups)`` of a grouped conv as in the official NFNet/NF-RegNet blocks:
    ``groups = int(channels·ratio) // group_size`` and ``width = group_size·groups`` (rounded
    down). Raises ``ValueError`` when that leaves no group."""
    groups = int(channels * ratio) // group_size
    if groups < 1:
        raise ValueError(
            f"bottleneck width int({channels}·{ratio}) is smaller than the group size "
            f"{group_size}: no group left"
        )
    return group_size * groups, groups
