"""γ-scaled activations of normalizer-free networks (Brock et al. 2021a, §4.1 and App. D).

A signal-preserving network multiplies each nonlinearity φ by

    γ = Var_{x~N(0,1)}[φ(x)]^(-1/2)                                   (Brock et al. 2021a, Eq. 2)

so that γ·φ(x) has unit variance when x is standard normal (the ReLU value is √(2/(1−1/π))).

* :data:`GAMMA_TABLE` holds the constants of the official code (``nfnets/base.py``) verbatim.
  They are Monte-Carlo estimates (App. D.1: ``mean(var(φ(x), axis=1))**-0.5`` on a (1024, 256)
  standard-normal sample), so they differ from the exact values by up to ~1e-3 (ReLU 1.71396
  instead of 1.71286). Use them to reproduce / load the official weights.
* :func:`activation_gamma` computes γ exactly by Gauss–Legendre quadrature in float64.
* :func:`nf_activation` builds a :class:`ScaledActivation` module computing ``γ·φ(x)``;
  :func:`get_activation` returns the raw (unscaled) PyTorch activation by name and is the single
  definition of every activation used here.

Definitions (JAX defaults of the official code, PyTorch NCHW layout):

* ``gelu`` is the **tanh approximation** (``jax.nn.gelu`` default, ``nn.GELU(approximate="tanh")``);
  ``gelu_exact`` is the erf form (PyTorch's default GELU; not in the official table, its "table"
  γ is the quadrature value).
* ``leaky_relu`` has slope 0.01; ``elu`` and ``celu`` have α = 1 (so they are the same function;
  their table constants differ only by Monte-Carlo noise); ``selu`` uses the standard constants.
* ``silu`` is x·sigmoid(x); ``soft_sign`` is x/(1+|x|); ``softplus`` is log(1+eˣ).
* ``glu`` and ``log_softmax`` act on the **channel axis** (``dim=1`` here, the last axis in the
  official NHWC code). ``glu`` splits the channels into halves (a, b) and returns a·sigmoid(b), so
  its output has half the channels; for independent a, b ~ N(0,1), Var = E[sigmoid(b)²], which
  is what the quadrature evaluates (γ ≈ 1.8484). ``log_softmax`` returns x_c − logsumexp(x); with
  many channels the logsumexp concentrates and Var → 1, so its exact γ is taken as 1 (the
  table's 1.0002 is that value plus sampling noise; for C channels Var = 1 − O(1/C)).
* ``identity`` has γ = 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from normfree.nn import native
from normfree.nn.eager_forms import custom_function_ok

__all__ = [
    "GAMMA_TABLE",
    "ScaledActivation",
    "TanhGELU",
    "activation_gamma",
    "activation_names",
    "check_block_activation",
    "get_activation",
    "nf_activation",
]

# Verbatim from the official `nfnets/base.py` (`nonlinearities`), identity added as 1.0.
GAMMA_TABLE: dict[str, float] = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "glu": 1.8484294414520264,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "log_softmax": 1.0002083778381348,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}


_GELU_C = math.sqrt(2.0 / math.pi)  # tanh-GELU: 0.5·x·(1 + tanh(c·(x + a·x³)))
_GELU_A = 0.044715


class _TanhGELUFunction(torch.autograd.Function):
    """tanh-GELU through the identity ``0.5·(1 + tanh(u)) = sigmoid(2u)`` on eager CPU.

    * PyTorch ops (``ext`` None): ``x · sigmoid(2c·x + 2ca·x³)`` in four passes of PyTorch's
      vectorised elementwise kernels (``addcmul``, ``mul_``, ``sigmoid_``, ``mul_``). On CPU
      this is ~1.3× faster than ``F.gelu(approximate="tanh")``, whose kernel evaluates a
      per-element tanh polynomial (4–5× slower than the erf GELU, see docs/benchmarks.md). The
      backward is PyTorch's own ``gelu_backward`` of the same function, so gradients are
      bit-identical to ``nn.GELU(approximate="tanh")``'s.
    * The native kernels (``ext``, :mod:`normfree.nn.native`, float32 dense ``x``): one pass
      forward and one backward (``csrc/tanh_gelu.h``), 2–3× faster than the op path on a 2-core
      x86 CPU; values within a few ulps of the float64 formula.

    Double backward (``create_graph=True``) takes ``gelu_backward``, which is differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ext: object = None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.ext = ext
        if ext is not None:
            return ext.tanh_gelu_forward(x)
        z = torch.addcmul(x.new_full((), 2.0 * _GELU_C), x, x, value=2.0 * _GELU_C * _GELU_A)
        return z.mul_(x).sigmoid_().mul_(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        if (  # the kernel reads grad's memory with x's strides, its values as they are
            ctx.ext is not None
            and not torch.is_grad_enabled()
            and grad.stride() == x.stride()
            and not grad.is_neg()
        ):
            return ctx.ext.tanh_gelu_backward(grad, x), None
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh"), None


class TanhGELU(nn.GELU):
    """``nn.GELU(approximate="tanh")`` (the official NFNets' ``jax.nn.gelu``) with a faster
    eager-CPU forward (:class:`_TanhGELUFunction`; within a few float32 ulps of PyTorch's kernel),
    and a one-pass forward and backward with the native kernels switched on
    (:func:`normfree.nn.native.set_native_kernels`, float32). Under
    ``torch.compile``/``torch.export``/``torch.fx``/tracing/scripting, on other devices and for
    other dtypes it is exactly ``nn.GELU(approximate="tanh")`` (a compiler fuses the native form
    anyway)."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fast = _eager_tanh_gelu(x)
            if fast is not None:
                return fast
        return nn.functional.gelu(x, approximate="tanh")


@torch.jit.unused
def _eager_tanh_gelu(x: torch.Tensor) -> torch.Tensor | None:
    """:class:`_TanhGELUFunction` where it applies (eager CPU float32/float64), else None."""
    # no tracer, compiler, torch.func transform or forward-mode AD (moment propagation takes
    # nn.GELU): the Function has neither a vmap nor a jvp rule
    if (
        not custom_function_ok(x)
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
    ):
        return None
    ext = native.extension("tanh_gelu") if x.dtype == torch.float32 else None
    if ext is not None and not _dense(x):
        ext = None
    return _TanhGELUFunction.apply(x, ext)


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x``'s elements fill its memory without gaps (NCHW or channels-last) and hold
    its values as they are (not a lazily negated view)."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return (x.is_contiguous() or channels_last) and not x.is_neg()


def _raw_activation_factories() -> dict[str, Callable[[bool], nn.Module]]:
    """name -> factory(inplace) of the unscaled activation (the single source of truth)."""
    return {
        "identity": lambda inplace: nn.Identity(),
        "relu": lambda inplace: nn.ReLU(inplace=inplace),
        "relu6": lambda inplace: nn.ReLU6(inplace=inplace),
        "leaky_relu": lambda inplace: nn.LeakyReLU(0.01, inplace=inplace),
        "elu": lambda inplace: nn.ELU(alpha=1.0, inplace=inplace),
        "celu": lambda inplace: nn.CELU(alpha=1.0, inplace=inplace),
        "selu": lambda inplace: nn.SELU(inplace=inplace),
        "silu": lambda inplace: nn.SiLU(inplace=inplace),
        "gelu": lambda inplace: TanhGELU(),
        "gelu_exact": lambda inplace: nn.GELU(approximate="none"),
        "tanh": lambda inplace: nn.Tanh(),
        "sigmoid": lambda inplace: nn.Sigmoid(),
        "softplus": lambda inplace: nn.Softplus(),
        "soft_sign": lambda inplace: nn.Softsign(),
        "log_sigmoid": lambda inplace: nn.LogSigmoid(),
        "log_softmax": lambda inplace: nn.LogSoftmax(dim=1),
        "glu": lambda inplace: nn.GLU(dim=1),
    }


_FACTORIES = _raw_activation_factories()
# Kinks (points where φ' jumps) of the registered activations; quadrature panels end there.
_KINKS: dict[str, tuple[float, ...]] = {
    "relu": (0.0,),
    "relu6": (0.0, 6.0),
    "leaky_relu": (0.0,),
    "elu": (0.0,),
    "celu": (0.0,),
    "selu": (0.0,),
    "soft_sign": (0.0,),
}


def activation_names() -> list[str]:
    """Names accepted by :func:`get_activation`, :func:`activation_gamma` and
    :func:`nf_activation`."""
    return sorted(_FACTORIES)


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"activation name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key not in _FACTORIES:
        raise ValueError(
            f"unknown activation {name!r}; known activations: {', '.join(activation_names())}"
        )
    return key


#: activations whose output has other channels than their input (``glu`` halves them)
CHANNEL_CHANGING = frozenset({"glu"})


def check_block_activation(name: str) -> str:
    """``name`` checked as the activation between a model's convolutions (the lower-case key):
    a known activation that keeps the channel count (``glu`` halves it, so no conv after it
    would fit)."""
    key = _check_name(name)
    if key in CHANNEL_CHANGING:
        keep = ", ".join(n for n in activation_names() if n not in CHANNEL_CHANGING)
        raise ValueError(
            f"activation {name!r} halves the channels (a·sigmoid(b) of the two halves), so the "
            f"model's convolutions would not fit; choose one that keeps them: {keep}"
        )
    return key


def get_activation(name: str, inplace: bool = False) -> nn.Module:
    """The raw (unscaled) PyTorch activation ``φ`` called ``name`` (see the module docstring for
    the definitions). ``inplace`` is passed on to activations that support it."""
    return _FACTORIES[_check_name(name)](bool(inplace))


# --------------------------------------------------------------------------------------------
# Quadrature
# --------------------------------------------------------------------------------------------
_HALF_WIDTH = 10.0  # N(0,1) mass beyond ±10 is 1.5e-23; the integrands grow at most like e^{|x|}
_PANEL = 0.125  # composite Gauss–Legendre panel width; grid points include every multiple of 1/8
_NODES_PER_PANEL = 16


def _quadrature_rule(breakpoints: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights (float64) of ∫ f(x) N(x; 0, 1) dx on [-10, 10] by composite 16-point
    Gauss–Legendre on panels of width 1/8, with extra panel edges at ``breakpoints`` so that a
    kink there costs no accuracy (Gauss rules converge slowly across a kink)."""
    edges = np.arange(-_HALF_WIDTH, _HALF_WIDTH + _PANEL / 2, _PANEL)
    extra = [float(b) for b in breakpoints if -_HALF_WIDTH < float(b) < _HALF_WIDTH]
    edges = np.unique(np.concatenate([edges, np.asarray(extra, dtype=np.float64)]))
    t, w = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)
    lo, hi = edges[:-1, None], edges[1:, None]
    half = (hi - lo) / 2
    x = (lo + half * (t[None, :] + 1)).ravel()
    weights = (half * w[None, :]).ravel() * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return torch.from_numpy(x), torch.from_numpy(weights)


def _variance(fn: Callable[[torch.Tensor], torch.Tensor], breakpoints: Sequence[float]) -> float:
    """Var_{x~N(0,1)}[fn(x)] by quadrature (two-pass: mean, then the centred second moment)."""
    x, w = _quadrature_rule(breakpoints)
    with torch.no_grad():
        y = fn(x.clone())
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    y = y.to(torch.float64)
    if y.shape != x.shape:
        raise ValueError(
            "activation_gamma needs an elementwise callable (output shape == input shape); "
            f"got output shape {tuple(y.shape)} for input shape {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(y).all()):
        raise ValueError("the activation returned non-finite values on [-10, 10]")
    mean = torch.sum(w * y) / torch.sum(w)
    return float(torch.sum(w * (y - mean) ** 2) / torch.sum(w))


@functools.cache
def _named_gamma(name: str) -> float:
    if name == "log_softmax":
        return 1.0  # many-channel limit, see the module docstring
    if name == "glu":
        # φ(a, b) = a·sigmoid(b), a, b iid N(0,1): E[φ] = 0 and Var = E[a²]·E[sigmoid(b)²].
        x, w = _quadrature_rule(())
        second_moment = float(torch.sum(w * torch.sigmoid(x) ** 2) / torch.sum(w))
        return second_moment**-0.5
    act = _FACTORIES[name](False).to(torch.float64)
    return _variance(act, _KINKS.get(name, ())) ** -0.5


def activation_gamma(
    fn: str | Callable[[torch.Tensor], torch.Tensor], breakpoints: Sequence[float] = ()
) -> float:
    """γ = Var_{x~N(0,1)}[φ(x)]^(-1/2) (Brock et al. 2021a, Eq. 2), computed deterministically.

    ``fn`` is a registered name (see :func:`activation_names`) or an elementwise callable, which
    is called once on a 1-D float64 tensor of quadrature nodes. The integral against the normal
    density is truncated to [-10, 10] and evaluated by composite 16-point Gauss–Legendre on panels
    of width 1/8; panel edges fall on every multiple of 1/8 (so kinks at 0, 6, … are exact) and on
    the given ``breakpoints`` (pass the kinks of a custom callable that lie elsewhere). Accuracy is
    near float64 round-off for piecewise-smooth φ (ReLU: √(2/(1−1/π)) to < 1e-12).
    """
    if isinstance(fn, str):
        return _named_gamma(_check_name(fn))
    if not callable(fn):
        raise TypeError(f"fn must be an activation name or a callable, got {type(fn).__name__}")
    var = _variance(fn, breakpoints)
    if not var > 0.0:
        raise ValueError(f"the activation has zero variance under N(0,1) (got {var}); γ undefined")
    return var**-0.5


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class ScaledActivation(nn.Module):
    """``γ·φ(x)``: an activation followed by a constant gain (Brock et al. 2021a, §4.1).

    ``gamma`` is a plain float (a compile-time constant for TorchScript/ONNX, not a parameter or
    buffer). With ``inplace=True`` the activation runs in place and, when no gradient is being
    recorded, so does the scaling (under autograd the scaling is out of place, because in-place
    activations save their output for the backward pass).
    """

    def __init__(self, act: nn.Module, gamma: float, name: str = "", inplace: bool = False) -> None:
        super().__init__()
        gamma = float(gamma)
        if not (math.isfinite(gamma) and gamma > 0.0):
            raise ValueError(f"gamma must be a positive finite number, got {gamma}")
        self.act = act
        self.gamma = gamma
        self.name = name
        self.inplace = bool(inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(x)
        if self.inplace and not (torch.is_grad_enabled() and y.requires_grad):
            return y.mul_(self.gamma)
        return y * self.gamma

    def extra_repr(self) -> str:
        return f"name={self.name!r}, gamma={self.gamma:.8g}, inplace={self.inplace}"


def nf_activation(
    name: str,
    gamma: Literal["table", "exact"] | float = "table",
    inplace: bool = False,
) -> ScaledActivation:
    """The γ-scaled activation ``name`` as a module.

    ``gamma``: ``"table"`` uses the official constant of :data:`GAMMA_TABLE` (needed for the
    official weights; activations not in the table, e.g. ``gelu_exact``, use the quadrature
    value); ``"exact"`` uses :func:`activation_gamma`; a positive float is used as given.
    ``"gelu"`` is the tanh approximation used by the official weights; ``"gelu_exact"`` is the
    erf form. Unknown names raise ``ValueError`` listing the known activations.
    """
    key = _check_name(name)
    if isinstance(gamma, str):
        if gamma == "table":
            value = GAMMA_TABLE[key] if key in GAMMA_TABLE else activation_gamma(key)
        elif gamma == "exact":
            value = activation_gamma(key)
        else:
            raise ValueError(f"gamma must be 'table', 'exact' or a float, got {gamma!r}")
    elif isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be 'table', 'exact' or a float, got {type(gamma).__name__}")
    else:
        value = float(gamma)
    return ScaledActivation(get_activation(key, inplace=inplace), value, name=key, inplace=inplace)
