"""Residual-network primitives shared by every family in normfree.

* :class:`ResidualBlock` - base class that marks a residual block and gives the analysis tools a
  probe on the residual branch (``branch_probe``) and the block's place in the network.
* :class:`NFResidualBlock` - the normalizer-free block frame
  ``h_{i+1} = shortcut + α·g·drop(f(φ(h_i)/β_i))`` shared by NF-ResNets, NFNets and NF-RegNets.
* :class:`StochasticDepth` - per-example branch dropping (Huang et al. 2016) with the per-block
  rate ``rate·i/N`` and *no* ``1/keep`` rescaling by default, as in the official NF-ResNet/NFNet
  code (Brock et al. 2021a, 2021b).
* :class:`SkipInitGain` - a learnable scalar at the end of a residual branch, initialised to 0
  (SkipInit, De & Smith 2020; ReZero, Bachlechner et al. 2020, is the same scalar).
* :class:`SqueezeExcite` - squeeze-and-excitation with the NFNet ×2 gate (Brock et al. 2021b, §4.1).
* :class:`ExpectedVariance` - the expected-variance bookkeeping of NF-ResNets
  (Brock et al. 2021a, §4: ``h_{i+1} = h_i + α·f_i(h_i/β_i)``, ``β_i = sqrt(Var(h_i))``,
  ``Var(h_{i+1}) = Var(h_i) + α²``, reset to 1 after each transition block).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from normfree.nn.activations import ScaledActivation
from normfree.nn.pointwise_conv import PointwiseConv2d

__all__ = [
    "ExpectedVariance",
    "NFResidualBlock",
    "ResidualBlock",
    "SkipInitGain",
    "SqueezeExcite",
    "StochasticDepth",
    "drop_path",
    "plain_forward",
    "stochastic_depth_rates",
]


class ResidualBlock(nn.Module):
    """Base class of every residual block in normfree.

    A subclass computes its residual branch ``r`` and passes it through ``self.branch_probe(r)``
    *before* stochastic depth, the skip gain and α are applied. ``branch_probe`` is an identity
    module, so a forward hook on it observes the branch output (Signal Propagation Plots report its
    variance as ``res_avg_var``, Brock et al. 2021a, §3).

    Attributes set by the model builder:
        stage_index: index of the stage that holds the block.
        is_transition: True for the first block of a stage whose shortcut changes shape
            (the expected variance resets after it).
        skip_gain: the block's :class:`SkipInitGain` if it has one, else ``None``.
    """

    def __init__(self, stage_index: int = 0, is_transition: bool = False) -> None:
        super().__init__()
        self.stage_index = stage_index
        self.is_transition = is_transition
        self.branch_probe = nn.Identity()
        self.skip_gain: SkipInitGain | None = None


def stochastic_depth_rates(rate: float, num_blocks: int) -> list[float]:
    """Per-block drop rates ``rate·i/N`` for blocks ``i = 0..N-1`` (official NF-ResNet/NFNet rule;
    the first block is never dropped)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate}")
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    return [rate * i / num_blocks for i in range(num_blocks)]


def drop_path(x: torch.Tensor, drop_rate: float, scale_by_keep: bool = False) -> torch.Tensor:
    """``x·mask`` with one Bernoulli(1 − ``drop_rate``) draw per example (mask shape
    ``(B, 1, ..., 1)``), divided by the keep rate when ``scale_by_keep``. A leaf of
    ``torch.fx`` traces (it reads the input's shape)."""
    keep = 1.0 - drop_rate
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
    if scale_by_keep:
        mask = mask / keep
    return x * mask


def drop_path_add(x: torch.Tensor, shortcut: torch.Tensor, drop_rate: float,
                  scale_by_keep: bool = False) -> torch.Tensor:
    """``shortcut + drop_path(x)`` in one pass (``torch.addcmul`` with the per-example mask): no
    masked copy of ``x`` is written or kept for the backward. A leaf of ``torch.fx`` traces."""
    keep = 1.0 - drop_rate
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
    if scale_by_keep:
        mask = mask / keep
    return torch.addcmul(shortcut, x, mask)


def _add_into_branch(r: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """``r + shortcut`` written into ``r``, a fresh conv / squeeze-excite output that no backward
    reads (no new activation-sized tensor per block); out of place when the dtypes differ
    (autocast), to keep the plain form's type promotion. A leaf of ``torch.fx`` traces."""
    if r.dtype != shortcut.dtype:
        return r + shortcut
    return r.add_(shortcut)


torch.fx.wrap("_add_into_branch")
torch.fx.wrap("drop_path")
torch.fx.wrap("drop_path_add")


class StochasticDepth(nn.Module):
    """Drop the residual branch of whole examples with probability ``drop_rate`` in training.

    The mask has shape ``(B, 1, ..., 1)`` (one Bernoulli draw per example). The official code does
    not rescale kept examples (``scale_by_keep=False``); set ``scale_by_keep=True`` for the
    ``1/keep`` rescaling of Huang et al. Identity in eval mode or when ``drop_rate == 0``.
    """

    def __init__(self, drop_rate: float = 0.0, scale_by_keep: bool = False) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.drop_rate = float(drop_rate)
        self.scale_by_keep = bool(scale_by_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        return drop_path(x, self.drop_rate, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate:g}, scale_by_keep={self.scale_by_keep}"


class SkipInitGain(nn.Module):
    """A learnable scalar ``g`` (parameter ``gain``, shape ``()``) multiplying a residual branch.

    SkipInit (De & Smith 2020) and ReZero (Bachlechner et al. 2020) both use
    ``x + g·F(x)`` with ``g`` initialised to 0, so every block starts as the identity.
    """

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.init = float(init)
        if not math.isfinite(self.init):
            raise ValueError(f"the skip gain's initial value must be finite, got {init}")
        self.gain = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gain.fill_(self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain

    def extra_repr(self) -> str:
        return f"init={self.init:g}"


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) with a scaled gate, as in NFNets.

    ``y = x · gate_gain · sigmoid(fc2(relu(fc1(mean_hw(x)))))``. NFNets use ``gate_gain = 2`` so
    the gate is 1 on average at init, and an *unscaled* ReLU inside (Brock et al. 2021b, §4.1).
    ``fc1``/``fc2`` are 1×1 convolutions with bias (the layout of timm's ports), as
    :class:`~normfree.nn.pointwise_conv.PointwiseConv2d` (an ``nn.Conv2d`` that runs as a matrix
    product on the pooled input).
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        gate_gain: float = 2.0,
        activation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if hidden_channels < 1:
            raise ValueError(f"hidden_channels must be >= 1, got {hidden_channels}")
        self.gate_gain = float(gate_gain)
        self.fc1 = PointwiseConv2d(channels, hidden_channels)
        self.act = activation if activation is not None else nn.ReLU()
        self.fc2 = PointwiseConv2d(hidden_channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official NF models' init (``nfnets/base.py`` ``SqueezeExcite``: two ``hk.Linear``
        with Haiku's defaults): weights from a normal of std ``1/√fan_in`` truncated at ±2 std,
        biases zero, so that the gate is exactly ``gate_gain·sigmoid(0)`` for a zero input.
        (``nn.Conv2d``'s own default, a uniform ±1/√fan_in with a random bias, is ~35 %
        narrower and shifts every channel's gate.) EfficientNets re-initialise theirs."""
        for fc in (self.fc1, self.fc2):
            std = 1.0 / math.sqrt(fc.in_channels)
            nn.init.trunc_normal_(fc.weight, std=std, a=-2.0 * std, b=2.0 * std)
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor, out_gain: torch.Tensor | None = None) -> torch.Tensor:
        """``x·gate``; ``out_gain`` (a tensor broadcastable to the ``(B, C, 1, 1)`` gate, e.g.
        α times a skip gain) multiplies the small gate instead of the output."""
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.fc2(self.act(self.fc1(s)))
        gate = _times_gain(torch.sigmoid(s) * self.gate_gain, out_gain)
        return x * gate


def _times_gain(gate: torch.Tensor, out_gain: torch.Tensor | None) -> torch.Tensor:
    """``gate·out_gain``, or ``gate`` when ``out_gain`` is None. A leaf of ``torch.fx`` traces:
    a trace of :class:`SqueezeExcite` alone makes ``out_gain`` an input that may be None."""
    return gate if out_gain is None else gate * out_gain


torch.fx.wrap("_times_gain")


class ExpectedVariance:
    """Expected variance of the residual stream while a model is built block by block.

    Brock et al. 2021a (§4): a block computes ``h + α·f(h/β)`` with ``β = sqrt(Var(h))``, so its
    branch sees unit-variance input and the variance grows by ``α²`` per block; after a transition
    block (whose shortcut sees the normalised input) the variance is reset to ``1 + α²``.

    >>> ev = ExpectedVariance(alpha=0.2)
    >>> [round(ev.next_block(first_in_stage=(i == 0)), 4) for i in range(3)]
    [1.0, 0.9806, 0.9623]
    >>> [round(v, 2) for v in ev.history]
    [1.04, 1.08, 1.12]
    """

    def __init__(self, alpha: float, initial_variance: float = 1.0) -> None:
        if not (math.isfinite(alpha) and alpha >= 0):  # NaN passed `alpha < 0`
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
        if alpha > 1e150:  # α² would overflow a float (the expected variance, 1/β with it)
            raise ValueError(f"alpha must be at most 1e150 (α² overflows), got {alpha}")
        self.alpha = float(alpha)
        self.variance = float(initial_variance)
        self.history: list[float] = []

    def next_block(self, first_in_stage: bool) -> float:
        """Return the input multiplier ``1/β`` for the next block and advance the bookkeeping.

        ``first_in_stage`` marks a stage's first block: the official code resets the expected
        variance to 1 after it, because its shortcut carries the normalised signal.
        """
        beta_multiplier = 1.0 / math.sqrt(self.variance)
        if first_in_stage:
            self.variance = 1.0
        self.variance += self.alpha**2
        self.history.append(self.variance)
        return beta_multiplier


@contextlib.contextmanager
def plain_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Run every block of ``model`` that has a ``fold_scales`` flag in its plain form inside the
    context, so that forward hooks inside the blocks see the quantities of the paper's
    formulation: :class:`NFResidualBlock` (every scale an op on the activations,
    ``branch_probe`` and ``act`` called), and the pre-activation blocks and
    :class:`~normfree.nn.NormAct` (each norm and PN-Act module called, not
    :func:`~normfree.nn.proxy_norm.norm_then_act`). The flags are restored on exit, also when
    the body raises."""
    blocks = [m for m in model.modules() if isinstance(getattr(m, "fold_scales", None), bool)]
    saved = [b.fold_scales for b in blocks]
    try:
        for b in blocks:
            b.fold_scales = False
        yield model
    finally:
        for b, flag in zip(blocks, saved):
            b.fold_scales = flag


class NFResidualBlock(ResidualBlock):
    """The normalizer-free residual block frame (Brock et al. 2021a, §4; official
    ``NFResBlock`` / ``NFBlock``)::

        out = act(x) · (1/β)                      # γ-scaled activation, unit-variance input
        shortcut = downsample(out) if the shape changes else x
        h = shortcut + α · skip_gain(drop_path(branch(out)))

    Subclasses build ``downsample`` (or leave it ``None``) and their convolutions, and implement
    :meth:`branch`. ``branch_probe`` sees the branch output before stochastic depth, the skip
    gain and α (the point of ``res_avg_var`` in Signal Propagation Plots).

    **Folded scales** (``fold_scales = True``, the default): γ, 1/β, α and the skip gain are
    scalars (or per-channel constants) times linear maps, so a subclass that implements
    :meth:`branch_folded` carries them in the weights of its Scaled-WS convs
    (:meth:`ScaledStdConv2d.forward_scaled`), O(weights) work instead
    of one pass over an activation tensor per scale, forward and backward. Outputs and every
    parameter's gradient equal the plain form's (up to rounding); the state dict is the same.
    The folded form skips ``branch_probe`` and the γ-scaling inside ``act``: hooks inside a
    block need :func:`plain_forward` (the analysis tools use it), or ``fold_scales = False``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        beta_multiplier: float,
        alpha: float,
        activation: nn.Module,
        drop_path_rate: float = 0.0,
        skipinit_init: float = 0.0,
        stage_index: int = 0,
    ) -> None:
        super().__init__(stage_index=stage_index, is_transition=stride > 1 or in_ch != out_ch)
        self.alpha = float(alpha)
        self.beta_multiplier = float(beta_multiplier)
        self.stride = int(stride)
        self.act = activation
        self.downsample = None  # set by subclasses whose shortcut changes shape
        self.drop_path = StochasticDepth(drop_path_rate)
        self.skip_gain = SkipInitGain(skipinit_init)
        self.fold_scales = True
        # set by normfree.nn.prescaled.bake_block_scales: the convs hold the scales
        self.scales_baked = False

    def branch(self, out: torch.Tensor) -> torch.Tensor:
        """The residual function ``f`` applied to the normalised input ``out``."""
        raise NotImplementedError

    def branch_folded(self, a: torch.Tensor, in_scale: float) -> torch.Tensor | None:
        """The fast form of ``α·g·branch(a·in_scale)`` (see :meth:`forward`): ``a`` is the
        *unscaled* activation φ(x); ``in_scale = γ/β`` goes into the weights of the convs that
        read it, every inner γ into the next conv's, ``α`` and the skip gain ``g`` into the last
        conv's (or the squeeze-excite gate's). Return ``None`` when the block cannot fold (its
        convs were replaced by plain ones, e.g. by
        :func:`~normfree.nn.fold_weight_standardization`); the plain form then runs. The base
        class never folds."""
        return None

    def act_fresh(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x) without γ, for the folded form, on a tensor that nothing else reads (a conv or
        squeeze-excite output): in place when φ is a ReLU (its backward needs only the output),
        which saves one activation-sized tensor per call in training."""
        phi = self.act.act
        if isinstance(phi, nn.ReLU):
            return torch.relu_(x)
        return phi(x)

    @staticmethod
    def can_fold(*convs: nn.Module | None) -> bool:
        """True when every given module is a :class:`ScaledStdConv2d`, a conv with the scales
        baked in (:mod:`normfree.nn.prescaled`), or ``None``."""
        return all(c is None or hasattr(c, "forward_scaled") for c in convs)

    def shortcut_folded(self, a: torch.Tensor, in_scale: float) -> torch.Tensor:
        """``downsample(a·in_scale)`` with the scale in the shortcut conv's weight."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_scales and not torch.jit.is_scripting():
            folded = self._forward_folded(x)
            if folded is not None:
                return folded
        return self.forward_plain(x)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The block as written in the paper: every scale an op on the activations."""
        if self.scales_baked:
            raise RuntimeError(
                "this block's convs hold its scales (normfree.deploy.prepare_for_inference): "
                "its plain form would apply them twice; run it with fold_scales=True, not "
                "scripted, or fold the original model again"
            )
        out = self.act(x) * self.beta_multiplier
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(out)
        r = self.branch_probe(self.branch(out))
        r = self.skip_gain(self.drop_path(r))
        return r * self.alpha + shortcut

    @torch.jit.unused
    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor | None:
        act = self.act
        if not isinstance(act, ScaledActivation):
            return None
        a = act.act(x)
        in_scale = act.gamma * self.beta_multiplier
        r = self.branch_folded(a, in_scale)
        if r is None:
            return None
        shortcut = x if self.downsample is None else self.shortcut_folded(a, in_scale)
        sd = self.drop_path
        if sd.training and sd.drop_rate > 0.0:
            return drop_path_add(r, shortcut, sd.drop_rate, sd.scale_by_keep)
        return _add_into_branch(r, shortcut)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, beta_multiplier={self.beta_multiplier:.6f}"
