"""Weight-standardized convolutions.

* :func:`scaled_standardize` / :class:`ScaledStdConv2d` - Scaled Weight Standardization of
  NF-ResNets / NFNets (Brock et al. 2021a, eq. 2; 2021b; official ``base.WSConv2D``)::

      Ŵ = gain · γ · (W − μ) · rsqrt(max(N·σ², eps))

  with μ, σ² the mean and *biased* variance of each output filter over (in/groups, kh, kw),
  N = (in/groups)·kh·kw the fan-in, and ``eps = 1e-4`` a floor on N·σ² (not added to it).
* :func:`qiao_standardize` / :class:`WSConv2d` - Weight Standardization of Qiao et al. 2019
  (arXiv 1903.10520, eq. 5; used with GroupNorm): ``Ŵ = (W − μ) / (σ_unbiased + 1e-5)``.

Both modules share :class:`StdConv2dBase`: TF/JAX ``"SAME"`` padding (default), fp32
standardization under autocast / low-precision weights, an inference cache of the standardized
weight, and folding into a plain ``nn.Conv2d`` (:meth:`StdConv2dBase.to_conv2d`,
:func:`fold_weight_standardization`). The two formulas and the forms they run in (eager CPU,
native, traced/compiled) are :mod:`normfree.nn.ws_functional`.
"""

from __future__ import annotations

import copy
import math
import re
from typing import ClassVar

import torch
from torch import Tensor, nn

from normfree.nn.eager_forms import cpu_autocast_dtype, recording, untransformed
from normfree.nn.padding import Conv2dSame, _pad_same_2d, conv_pair, resolve_padding
from normfree.nn.param_updates import tensor_key
from normfree.nn.pointwise_conv import (
    PointwiseConv2d,
    _PointwiseForms,
    pointwise_conv2d,
    strided_pointwise_conv2d,
)
from normfree.nn.unit_norms import (
    forget_unit_norms,
    unit_norm_from_forward,
    unit_norms_from_forward,
)
from normfree.nn.ws_functional import (
    _reduce_dims,
    _scaled_standardize_parts,
    qiao_standardize,
    scaled_standardize,
)

torch.fx.wrap("_pad_same_2d")  # torch.fx leaves: they branch on the input's size / device
torch.fx.wrap("strided_pointwise_conv2d")

__all__ = [
    "ScaledStdConv2d",
    "StdConv2dBase",
    "WSConv2d",
    "clear_caches",
    "fold_weight_standardization",
    "qiao_standardize",
    "scaled_standardize",
    "unit_norm_from_forward",
    "unit_norms_from_forward",
]

def _upcast_half(weight: Tensor) -> Tensor:
    """fp16/bf16 → fp32; other dtypes unchanged."""
    if weight.dtype == torch.float16 or weight.dtype == torch.bfloat16:
        return weight.float()
    return weight


for _leaf in ("_upcast_half", "scaled_standardize", "qiao_standardize"):
    torch.fx.wrap(_leaf)


def _cacheable(*tensors: Tensor | None) -> bool:
    """Whether a no-grad eager forward may cache the weights computed from ``tensors``: not for
    inference tensors (no version counter), tensors wrapped by a ``torch.func`` transform (no
    memory of their own) or dual tensors of forward-mode AD (the tangent is not part of the
    key). Traced and compiled forwards never reach it (see :class:`StdConv2dBase`)."""
    present = [t for t in tensors if t is not None]
    return not any(t.is_inference() for t in present) and untransformed(*present)


class StdConv2dBase(_PointwiseForms, nn.Conv2d):
    """Base of weight-standardized 2-D convs: ``conv(x, standardize(W)) + bias``.

    Subclasses override :meth:`standardize` (the formula, applied to an fp32/fp64 weight).

    * ``padding="same"`` (default) is TF/JAX ``"SAME"``: a static symmetric padding when that is
      equivalent (stride 1 with odd kernels, 1×1 kernels), otherwise a dynamic asymmetric pad
      (extra pixel after), as the official NFNet weights expect. ``"valid"``, an int or a pair
      behave as in ``nn.Conv2d``.
    * The standardization runs in fp32 when the weight is fp16/bf16 and ignores autocast; the
      result is cast back to the weight's dtype (autocast then casts it for the conv, as for a
      plain conv). Under CPU autocast a :class:`ScaledStdConv2d` hands the conv its float32
      weight's result in autocast's dtype already: the same bits, cast once per cached copy in
      evaluation, and written so by the native kernels in training (which also read the
      gradient in that dtype: :func:`scaled_standardize`).
    * Inference cache: when no gradient can flow to the parameters (``torch.no_grad``,
      ``inference_mode`` or frozen parameters) the standardized weight is computed once and reused
      until a parameter changes. The key is each parameter's version, memory, dtype, device,
      shape and strides, the CPU autocast dtype (:class:`ScaledStdConv2d`), the number of
      optimizer steps taken in this process (fused optimizer
      kernels update parameters without bumping their version:
      :mod:`normfree.nn.param_updates`) and ``eps``/``gamma``, so ``optimizer.step()``,
      ``load_state_dict``, ``.to()`` and ``param.data = t`` (other memory) invalidate it. The
      cache is not
      part of the state dict and is skipped under TorchScript, tracing, ``torch.compile``,
      ``torch.func`` transforms, forward-mode AD and for inference tensors; a traced or compiled
      forward neither reads nor drops it (Dynamo would guard on it and recompile the training
      graph after the first eager evaluation), and ``model.train()`` drops it, so that no
      stale copy is kept while training. Writes that the version counter does not see bypass
      all of these: in-place writes through ``param.data`` (``param.data.mul_(2)``), and writes
      through another tensor sharing the parameter's memory (the flat vector whose views
      ``torch.nn.utils.vector_to_parameters`` made the parameters, written in place and set
      again). After them, call :func:`clear_caches` on the model (or
      :meth:`clear_weight_cache` on the conv).
    * Folding: :meth:`to_conv2d` returns an equivalent plain conv (for export / deployment).
    """

    __jit_ignored_attributes__: ClassVar[list[str]] = ["_ws_cache"]
    _ws_cache: tuple | None = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = "same",
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups ({groups})"
            )
        kernel_size = conv_pair(kernel_size, "kernel_size")
        stride = conv_pair(stride, "stride")
        dilation = conv_pair(dilation, "dilation")
        static, dynamic = resolve_padding(padding, kernel_size, stride, dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, static, dilation, groups, bias,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.same_padding: bool = isinstance(padding, str) and padding.lower() == "same"
        self.dynamic_padding: bool = dynamic

    @property
    def fan_in(self) -> int:
        """N = (in/groups)·kh·kw."""
        return self.weight[0].numel()

    def reset_parameters(self) -> None:
        """Raw weight ~ N(0, 1/N) (fan-in normal, official ``VarianceScaling(1, fan_in, normal)``);
        bias 0."""
        nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(self.weight[0].numel()))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self._ws_cache = None

    def standardize(self, weight: Tensor) -> Tensor:
        """The standardization formula, applied to ``weight`` (fp32 or fp64). Override it."""
        raise NotImplementedError

    def standardized_weight(self) -> Tensor:
        """The effective conv weight (with autograd, no cache), in the weight's dtype."""
        weight = self.weight
        return self.standardize(_upcast_half(weight)).to(weight.dtype)

    def clear_weight_cache(self) -> None:
        """Drop the cached inference weight (it is rebuilt on the next no-grad forward)."""
        self._ws_cache = None

    def train(self, mode: bool = True) -> StdConv2dBase:
        """``nn.Module.train``; switching to training mode also drops the inference cache (a
        compiled training step cannot: it leaves the cache alone)."""
        if mode:
            self._ws_cache = None
        return super().train(mode)

    def _formula_key(self) -> tuple:
        """The formula's constants, part of the cache key (assigning ``eps``/``gamma`` after
        construction changes the standardized weight)."""
        return (getattr(self, "eps", None), getattr(self, "gamma", None))

    @torch.jit.unused
    def _eager_weight(self) -> Tensor:
        weight, gain = self.weight, getattr(self, "gain", None)
        if isinstance(weight, torch.fx.Proxy) or recording():  # traced: the formula, no cache
            return self.standardized_weight()
        grad_wanted = torch.is_grad_enabled() and (
            weight.requires_grad or (gain is not None and gain.requires_grad)
        )
        if grad_wanted or not _cacheable(weight, gain):
            if self._ws_cache is not None:
                self._ws_cache = None  # don't keep a stale copy alive while training
            return self.standardized_weight()
        key: tuple = (
            torch.is_inference_mode_enabled(),
            self._formula_key(),
            tensor_key(weight),
            None if gain is None else tensor_key(gain),
        )
        cache = self._ws_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            standardized = self.standardized_weight()
        # Holding detached views of the parameters keeps their storage alive, so a new parameter
        # tensor can never reuse the cached data pointer.
        pinned = (weight.detach(), None if gain is None else gain.detach())
        self._ws_cache = (key, standardized, pinned)
        return standardized

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            weight = self.standardized_weight()
        else:
            weight = self._eager_weight()
        return self._conv(x, weight, self.bias)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The convolution with "SAME" padding and the faster CPU forms of 1×1 convs
        (:mod:`normfree.nn.pointwise_conv`)."""
        if self.dynamic_padding:
            x = _pad_same_2d(x, self.kernel_size, self.stride, self.dilation)
        if self.strided_pointwise:
            return strided_pointwise_conv2d(x, weight, bias, self.stride, self.groups)
        if self.pointwise:
            return pointwise_conv2d(x, weight, bias)
        return self._conv_forward(x, weight, bias)

    def _apply(self, fn, recurse: bool = True):
        self._ws_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._ws_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_ws_cache"] = None
        return state

    def to_conv2d(
        self,
        weight_bias: tuple[Tensor, Tensor | None] | None = None,
        classes: tuple[type[nn.Conv2d], type[Conv2dSame]] = (nn.Conv2d, Conv2dSame),
    ) -> nn.Conv2d:
        """A plain conv with the standardized weight folded in (same outputs, same device/dtype).

        Returns ``nn.Conv2d`` when the padding is static (a 1×1 stride-1 conv as
        :class:`~normfree.nn.pointwise_conv.PointwiseConv2d`, an ``nn.Conv2d`` with faster CPU
        inference) and :class:`~normfree.nn.padding.Conv2dSame` (an ``nn.Conv2d`` subclass) when
        ``"SAME"`` needs a dynamic pad, or the two ``classes`` given instead; ``weight_bias``
        replaces the standardized weight and bias (e.g.
        :meth:`ScaledStdConv2d.effective_weight_bias` with a block's scales).
        """
        plain, same = classes
        ch = (self.in_channels, self.out_channels, self.kernel_size, self.stride)
        kwargs = {"device": self.weight.device, "dtype": self.weight.dtype}
        conv: nn.Conv2d
        if self.dynamic_padding:
            conv = same(*ch, self.dilation, self.groups, self.bias is not None, **kwargs)
        elif plain is nn.Conv2d and self.pointwise:
            conv = PointwiseConv2d(self.in_channels, self.out_channels, self.bias is not None,
                                   **kwargs)  # fmt: skip
        else:
            conv = plain(
                *ch, self.padding, self.dilation, self.groups, self.bias is not None, **kwargs
            )
        with torch.no_grad():
            weight, bias = weight_bias or (self.standardized_weight(), self.bias)
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.same_padding:
            text = re.sub(r", padding=\(\d+, \d+\)", "", text) + ", padding='same'"
        return text


class ScaledStdConv2d(StdConv2dBase):
    """Conv2d with Scaled Weight Standardization (Brock et al. 2021a, eq. 2; official
    ``base.WSConv2D``): ``Ŵ = gain·γ·(W − μ)·rsqrt(max(N·var, eps))`` per output channel.

    Args:
        padding: ``"same"`` (default, TF/JAX semantics as in the official NF models),
            ``"valid"``, an int or a pair.
        gain_init: initial value of the learnable per-channel ``gain`` (shape ``(out,)``).
        eps: floor on N·var (official 1e-4).
        gamma: fixed scale folded into the weight (e.g. an activation's γ; the official models
            keep γ in the activation and use 1).

    Raw weight ~ N(0, 1/N), bias 0, ``gain = gain_init`` (:meth:`reset_parameters`). Training
    differentiates through :func:`scaled_standardize` (on eager CPU group norm's backward).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = "same",
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        gain_init: float = 1.0,
        eps: float = 1e-4,
        gamma: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.gain_init = float(gain_init)
        if not math.isfinite(self.gain_init):
            raise ValueError(f"gain_init must be a finite number, got {gain_init!r}")
        self.eps = float(eps)
        self.gamma = float(gamma)
        self.gain = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fan-in normal weight, zero bias, ``gain = gain_init``."""
        super().reset_parameters()
        gain = getattr(self, "gain", None)  # absent while nn.Conv2d.__init__ runs
        if gain is not None:
            nn.init.constant_(gain, self.gain_init)

    def standardize(self, weight: Tensor) -> Tensor:
        return scaled_standardize(weight, self.gain.to(weight.dtype), self.eps, self.gamma)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_scaled(x)

    def forward_scaled(
        self,
        x: Tensor,
        in_scale: float = 1.0,
        out_scale: float = 1.0,
        out_gain: Tensor | None = None,
    ) -> Tensor:
        """``conv(in_scale·x, Ŵ)·s + bias·s`` with ``s = out_scale·out_gain`` (1 by default).

        The scales cost O(weights), not O(activations): they go into the standardized weight
        (``in_scale·s``) and the bias (``s``), which is exact because a convolution is linear.
        ``out_gain`` is a tensor broadcastable to ``(out,)`` (e.g. a 0-d SkipInit gain); its
        gradient is that of the plain form. Residual blocks use this to carry γ, 1/β, α and the
        skip gain in the weights (:class:`~normfree.nn.residual.NFResidualBlock`). It is a
        method, not ``forward`` arguments, so ``torch.fx`` traces ``forward`` with one input;
        module hooks do not see these calls.
        """
        if torch.jit.is_scripting():
            weight, bias = self.effective_weight_bias(in_scale, out_scale, out_gain)
        else:
            weight, bias = self._eager_weight_bias(in_scale, out_scale, out_gain)
        return self._conv(x, weight, bias)

    def effective_weight_bias(
        self,
        in_scale: float = 1.0,
        out_scale: float = 1.0,
        out_gain: Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The conv weight and bias :meth:`forward` uses (with autograd, no cache); the weight
        in ``out_dtype`` (None: the parameter's), rounded once. An eager training step under
        CPU autocast asks for autocast's dtype, the one the convolution casts the weight to
        (:func:`~normfree.nn.scaled_standardize`: the native kernels write it directly)."""
        if in_scale == 1.0 and out_scale == 1.0 and out_gain is None and out_dtype is None:
            return self.standardized_weight(), self.bias
        weight = self.weight
        low = weight.dtype == torch.float16 or weight.dtype == torch.bfloat16
        work = weight.float() if low else weight
        gain = self.gain.to(work.dtype)
        if out_gain is not None:
            gain = gain * out_gain.to(work.dtype)
        dtype = weight.dtype if out_dtype is None else out_dtype
        w = scaled_standardize(work, gain, self.eps, self.gamma * in_scale * out_scale, dtype)
        return w, _scaled_bias(self.bias, out_scale, out_gain)

    @torch.jit.unused
    def _traced_weight_bias(
        self, in_scale: float, out_scale: float, out_gain: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """As :meth:`effective_weight_bias` while ``torch.fx`` traces (parameters are proxies:
        dtype and rank come from the real parameter, the formula is the plain one)."""
        real = dict(self.named_parameters(recurse=False))["weight"]  # fx proxies self.weight
        weight: Tensor = self.weight
        gain: Tensor = self.gain
        low = real.dtype == torch.float16 or real.dtype == torch.bfloat16
        work = weight.float() if low else weight
        gain = gain.float() if low else gain
        if out_gain is not None:
            gain = gain * (out_gain.float() if low else out_gain)
        gamma = self.gamma * in_scale * out_scale
        w = _scaled_standardize_parts(work, gain, self.eps, gamma, _reduce_dims(real))[0]
        return w.to(real.dtype) if low else w, _scaled_bias(self.bias, out_scale, out_gain)

    @torch.jit.unused
    def _eager_weight_bias(
        self, in_scale: float, out_scale: float, out_gain: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(self.weight, torch.fx.Proxy):
            return self._traced_weight_bias(in_scale, out_scale, out_gain)
        if recording():  # jit.trace / torch.compile: the formula, no cache (class docstring)
            return self.effective_weight_bias(in_scale, out_scale, out_gain)
        weight, gain, bias = self.weight, self.gain, self.bias
        grad_wanted = torch.is_grad_enabled() and (
            weight.requires_grad
            or gain.requires_grad
            or (bias is not None and bias.requires_grad)
            or (out_gain is not None and out_gain.requires_grad)
        )
        # under CPU autocast the weight comes in the dtype the convolution would cast it to:
        # written so by the native kernels in training, cast once per cached copy in evaluation
        dtype = cpu_autocast_dtype(weight)
        if grad_wanted or not _cacheable(weight, gain, bias, out_gain):
            if self._ws_cache is not None:
                self._ws_cache = None  # don't keep a stale copy alive while training
            return self.effective_weight_bias(in_scale, out_scale, out_gain, dtype)
        key: tuple = (torch.is_inference_mode_enabled(), self._formula_key(), in_scale, out_scale)
        key += (dtype,)
        tensors = [t for t in (weight, gain, bias, out_gain) if t is not None]
        key += tuple(None if t is None else tensor_key(t) for t in (weight, gain, bias, out_gain))
        cache = self._ws_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            value = self.effective_weight_bias(in_scale, out_scale, out_gain, dtype)
        # Holding detached views of the tensors keeps their storage alive, so a new tensor can
        # never reuse a cached data pointer.
        self._ws_cache = (key, value, [t.detach() for t in tensors])
        return value

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", eps={self.eps:g}"
        return text + f", gamma={self.gamma:g}" if self.gamma != 1.0 else text


def _scaled_bias(bias: Tensor | None, out_scale: float, out_gain: Tensor | None) -> Tensor | None:
    if bias is None:
        return bias
    if out_gain is not None:
        return bias * (out_gain.to(bias.dtype) * out_scale)
    if out_scale != 1.0:
        return bias * out_scale
    return bias


class WSConv2d(StdConv2dBase):
    """Conv2d with the Weight Standardization of Qiao et al. 2019 (arXiv 1903.10520, eq. 5):
    ``Ŵ = (W − μ) / (σ_unbiased + eps)`` per output filter; no gain, no fan-in scaling. Meant
    to be followed by GroupNorm (the WS+GN baseline). ``padding`` as in :class:`StdConv2dBase`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = "same",
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            device=device, dtype=dtype,
        )  # fmt: skip
        if self.fan_in < 2:
            raise ValueError(
                "WSConv2d needs a fan-in (in_channels/groups·kh·kw) >= 2 for the unbiased std, "
                f"got {self.fan_in}"
            )
        self.eps = float(eps)

    def standardize(self, weight: Tensor) -> Tensor:
        return qiao_standardize(weight, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps:g}"


def clear_caches(model: nn.Module) -> None:
    """Drop everything normfree keeps about ``model``'s parameters between calls: each
    Scaled-WS conv's inference cache, and the per-unit weight statistics and gradient norms
    that adaptive gradient clipping would read (:mod:`normfree.nn.unit_norms`).

    Needed only after writes that PyTorch's version counter does not see (the
    :class:`StdConv2dBase` docstring lists them); everything else invalidates by itself."""
    for module in model.modules():
        if isinstance(module, StdConv2dBase):
            module.clear_weight_cache()
    forget_unit_norms(list(model.parameters()))


def fold_weight_standardization(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every :class:`StdConv2dBase` in ``model`` by its folded plain conv
    (:meth:`StdConv2dBase.to_conv2d`), for export and inference. Works on a deep copy unless
    ``inplace``; a bare WS conv is returned folded."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, StdConv2dBase):
        return model.to_conv2d()
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, StdConv2dBase):
                setattr(parent, name, child.to_conv2d())
    return model
