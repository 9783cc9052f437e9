"""The dataflow view of a BatchNorm network that conversion works on, from a ``torch.fx`` trace.

Nothing here guesses from module names: every pattern is read from the traced graph.

* :func:`trace` - ``torch.fx.symbolic_trace`` with every ``nn.modules.batchnorm._BatchNorm`` kept
  as one leaf call (so that subclasses are seen as the BN they are), and every frozen BN
  (torchvision's ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``: :func:`is_frozen_bn`).
* :func:`find_norms` - each BatchNorm call with the conv that feeds it (a :data:`PLAIN_CONVS`
  module; when the BN's
  input is a conv used only by that BN: the foldable ``Conv→BN`` pattern of Ioffe & Szegedy 2015,
  §3.2) and the activation that follows it (when the BN's only user is an elementwise
  activation: ``Conv→BN→act``).
* :func:`find_residual_adds` - every ``a + b`` of two traced tensors whose operands differ in
  *convolution depth* (the most convolutions on any path from the input): the deeper operand is
  the residual branch ``F(x)``, the other the skip path (identity or projection shortcut), as in
  ``h + F(h)`` of He et al. 2016. Sums of equally deep operands are left alone.
* :func:`last_linear` - the classifier: the last ``nn.Linear`` call in graph order.
* :func:`keep_train_time_regularizers` - the trace is the eval-mode forward, so stochastic-depth
  modules are kept as leaf calls (:func:`is_stochastic_depth`) and every functional dropout
  with ``p > 0`` (recorded with ``training=False``; ``torch.nn.functional``'s or torch's own
  ``torch.dropout`` family) becomes its ``nn.Dropout*`` module: the
  converted model drops out in ``train()`` as the source did.

Every structural problem raises :class:`ConversionError` naming the module and what the modes
support.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfree.console import first_line
from normfree.convert.layers import FeatureDropout
from normfree.nn.conv import HeConv2d
from normfree.nn.pointwise_conv import PointwiseConv2d
from normfree.nn.residual import StochasticDepth

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "PLAIN_CONVS",
    "ConversionError",
    "NormSite",
    "ResidualAdd",
    "conv_depths",
    "find_norms",
    "find_residual_adds",
    "is_bn_act",
    "is_frozen_bn",
    "is_norm",
    "is_same_conv",
    "is_stochastic_depth",
    "keep_train_time_regularizers",
    "last_linear",
    "norm_channels",
    "trace",
]

# Activation modules whose forward is elementwise (Proxy Norm and γ tables need that).
ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.CELU, nn.SELU,
)  # fmt: skip
_ACT_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6,
                  torch.nn.functional.silu, torch.nn.functional.gelu,
                  torch.nn.functional.hardswish}  # fmt: skip
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_FUNCTIONAL_BN = {torch.nn.functional.batch_norm, torch.batch_norm}
# Conv modules whose forward is exactly ``F.conv2d(x, weight, bias, ...)`` of their attributes:
# kept as leaf calls, so that a BN after one folds into it. normfree's own convs of BN models
# compute the same convolution in other forms (a 1×1 as a matrix product); other subclasses
# (timm's StdConv2d) change it, and are traced through. ``Conv2dSame`` (:func:`is_same_conv`)
# pads first and is a leaf of its own kind.
PLAIN_CONVS: tuple[type[nn.Conv2d], ...] = (nn.Conv2d, HeConv2d, PointwiseConv2d)


class ConversionError(ValueError):
    """A model (or a part of it) that a conversion mode cannot handle; the message names the
    module and what the mode supports."""


def is_frozen_bn(module: nn.Module) -> bool:
    """A frozen BatchNorm: torchvision's ``FrozenBatchNorm2d`` (detection backbones, timm's
    ``freeze_batch_norm_2d``) or timm's ``FrozenBatchNormAct2d``, the eval transform of a BN
    held in buffers (``weight``, ``bias``, ``running_mean``, ``running_var``, ``eps``);
    recognised by class name and those tensors (neither library is imported)."""
    return (
        type(module).__name__ in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")
        and all(
            isinstance(getattr(module, key, None), torch.Tensor) and getattr(module, key).dim() == 1
            for key in ("weight", "bias", "running_mean", "running_var")
        )
        and isinstance(getattr(module, "eps", None), float)
    )


def is_same_conv(module: nn.Module | None) -> bool:
    """timm's or normfree's ``Conv2dSame``: an ``nn.Conv2d`` that pads TF's ``"SAME"`` for each
    input's size, then convolves with its own weight and bias (timm's ``tf_*`` models). Kept as
    a leaf (its padding branches on the input's shape, which torch.fx cannot trace); ``bn_free``
    folds a BN into it."""
    return isinstance(module, nn.Conv2d) and type(module).__name__ == "Conv2dSame"


def is_stochastic_depth(module: nn.Module) -> bool:
    """A stochastic-depth (or DropBlock) module: normfree's ``StochasticDepth``, timm's
    ``DropPath`` and ``DropBlock2d``, torchvision's ``StochasticDepth``. Each is the identity in
    eval mode, so an eval-mode trace through it would drop it; it is kept as a leaf call
    instead. The others are recognised by class name and their rate attribute (neither library
    is imported)."""
    return _stochastic_depth_rate(module) is not None


def _stochastic_depth_rate(module: nn.Module) -> float | None:
    if isinstance(module, StochasticDepth):
        return module.drop_rate
    name = type(module).__name__
    rate = getattr(module, "p" if name == "StochasticDepth" else "drop_prob", None)
    known = name in ("DropPath", "DropBlock2d", "StochasticDepth")
    return float(rate) if known and isinstance(rate, float) else None


# functional dropouts and the module that applies each in train() only (Srivastava et al. 2014)
_FUNCTIONAL_DROPOUT: dict[Any, type[nn.Module]] = {
    F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
    F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
    F.feature_alpha_dropout: nn.FeatureAlphaDropout,
}  # fmt: skip
_DROPOUT_ARGS = ("input", "p", "training", "inplace")  # each functional dropout's parameters
# torch's own dropouts, (input, p, train) with no defaults, and ``_``: in place
_TORCH_DROPOUT: dict[Any, tuple[type[nn.Module], bool]] = {
    torch.dropout: (nn.Dropout, False), torch.dropout_: (nn.Dropout, True),
    torch.alpha_dropout: (nn.AlphaDropout, False), torch.alpha_dropout_: (nn.AlphaDropout, True),
    torch.feature_dropout: (FeatureDropout, False),
    torch.feature_dropout_: (FeatureDropout, True),
    torch.feature_alpha_dropout: (nn.FeatureAlphaDropout, False),
    torch.feature_alpha_dropout_: (nn.FeatureAlphaDropout, True),
}  # fmt: skip
_DROPOUT_PREFIX = "functional_dropout"


def _dropout_call(node: fx.Node) -> tuple[type[nn.Module], Any, Any, Any, Any] | None:
    """``(module kind, input, p, training, inplace)`` of a dropout call node, else None."""
    if node.op != "call_function":
        return None
    if node.target in _FUNCTIONAL_DROPOUT:
        x, p, training, inplace = (_argument(node, i, key) for i, key in enumerate(_DROPOUT_ARGS))
        return _FUNCTIONAL_DROPOUT[node.target], x, p, training, inplace
    if node.target in _TORCH_DROPOUT:
        kind, inplace = _TORCH_DROPOUT[node.target]
        args: list[Any] = [*node.args]
        args += [node.kwargs[k] for k in ("input", "p", "train") if k in node.kwargs]
        return (kind, args[0], args[1], args[2], inplace) if len(args) == 3 else None
    return None


def _argument(node: fx.Node, index: int, key: str) -> Any:
    """Argument ``key`` (parameter ``index``) of the call ``node``: as passed, else its default."""
    if len(node.args) > index:
        return node.args[index]
    if key in node.kwargs:
        return node.kwargs[key]
    assert callable(node.target)  # (a call_function node)
    return inspect.signature(node.target).parameters[key].default


def keep_train_time_regularizers(gm: fx.GraphModule) -> int:
    """Make the eval-mode trace ``gm`` drop out in training as its source does; returns the
    dropout and stochastic-depth calls (with a rate above 0) the graph now has, which act in
    ``train()`` only.

    A functional dropout traced in eval mode is a call with ``training=False`` (the value
    ``self.training`` had): each one with ``p > 0`` becomes a call of its ``nn.Dropout*`` module
    (same ``p`` and ``inplace``, in ``gm``'s mode), which reads the converted model's mode. A
    dropout the source wrote with ``training=False`` literally never drops anything either way,
    so reading it as ``self.training`` is the only reading that changes training. One recorded
    with ``training=True`` (written so, or the default of ``F.dropout``) drops out in eval mode
    too, and is left as it is. Dropout modules and the leaf stochastic-depth calls
    (:func:`is_stochastic_depth`) already follow ``train()``."""
    made = 0
    for node in list(gm.graph.nodes):
        call = _dropout_call(node)
        if call is None:
            continue
        kind, x, p, training, inplace = call
        rate = float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else 0.0
        if rate <= 0.0 or training is not False:  # (training=True: it drops in eval too)
            continue  # p = 0 is the identity; a traced p cannot be made a module's constant
        name = f"{_DROPOUT_PREFIX}{made}"
        gm.add_submodule(name, kind(rate, inplace=bool(inplace)).train(gm.training))
        with gm.graph.inserting_after(node):
            module_call = gm.graph.call_module(name, (x,))
        node.replace_all_uses_with(module_call)
        gm.graph.erase_node(node)
        made += 1
    if made:
        gm.recompile()
    called = [gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    rates = [_dropout_rate(m) or _stochastic_depth_rate(m) or 0.0 for m in called]
    return sum(rate > 0 for rate in rates)


def _dropout_rate(module: nn.Module) -> float | None:
    dropouts = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                nn.FeatureAlphaDropout, FeatureDropout)  # fmt: skip
    return float(module.p) if isinstance(module, dropouts) else None


def is_norm(module: nn.Module) -> bool:
    """A module conversion treats as one BatchNorm site: a ``_BatchNorm`` or a frozen BN."""
    return isinstance(module, _BatchNorm) or is_frozen_bn(module)


def norm_channels(module: nn.Module) -> int:
    """The channels of a BN site (frozen BNs have no ``num_features``)."""
    features = getattr(module, "num_features", None)
    return int(features) if isinstance(features, int) else int(module.running_mean.numel())


class _Tracer(fx.Tracer):
    """Keeps every BatchNorm (subclasses and frozen BNs too), every :data:`PLAIN_CONVS` conv,
    every ``Conv2dSame`` (:func:`is_same_conv`), every stochastic-depth module
    (:func:`is_stochastic_depth`) and every plain torch.nn module as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            is_norm(m)
            or type(m) in PLAIN_CONVS
            or is_same_conv(m)
            or is_stochastic_depth(m)
            or super().is_leaf_module(m, module_qualified_name)
        )


def _failing_module(error: BaseException, model: nn.Module) -> str:
    """`` in Conv2dSame 'conv_stem'``: the innermost module of ``model`` whose ``forward`` is on
    the traceback of ``error``, or ``""``."""
    names = {id(m): name for name, m in model.named_modules() if name}
    found = ""
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = f" in {type(owner).__name__} '{names[id(owner)]}'"
        tb = tb.tb_next
    return found


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as an ``fx.GraphModule`` sharing its modules (a ``ConversionError`` when the
    model cannot be traced)."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ...
        where = _failing_module(e, model)
        raise ConversionError(
            f"cannot trace {type(model).__name__} with torch.fx{where} ({type(e).__name__}: "
            f"{first_line(e)}); conversion needs a model whose forward torch.fx can trace (no "
            "Python control flow on tensor values or shapes)"
        ) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


@dataclass
class NormSite:
    """One BatchNorm call in the graph.

    Attributes:
        bn: the BN call node; ``bn_name`` its module's qualified name.
        conv: the ``nn.Conv2d`` call feeding it when that conv's only user is this BN, else None.
        act: the elementwise activation call that is the BN's only user (or the only user of
            a stochastic-depth call that is), else None (always None for a fused
            ``BatchNormAct2d``, whose activation is inside it).
    """

    bn: fx.Node
    bn_name: str
    conv: fx.Node | None
    act: fx.Node | None


@dataclass
class ResidualAdd:
    """``add(branch, skip)``: ``branch`` is the operand with more convolutions on its path."""

    node: fx.Node
    branch: fx.Node
    skip: fx.Node


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(_module(gm, node)) in ELEMENTWISE_ACTIVATIONS
    if node.op == "call_function":
        return node.target in _ACT_FUNCTIONS and len(node.args) == 1 and not node.kwargs
    return False


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(_module(gm, node)).__name__} '{node.target}'"
    if node.op == "placeholder":
        return "the model input"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def _input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose value depends on a graph input (activations, not only parameters: timm's
    ``StdConv2d`` standardizes its weight with a functional ``batch_norm`` of the weight)."""
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(i in found for i in node.all_input_nodes):
            found.add(node)
    return found


def find_norms(gm: fx.GraphModule, running_stats: bool = True) -> list[NormSite]:
    """Every BatchNorm call of ``gm`` in graph order, with its feeding conv and following act.

    Raises :class:`ConversionError` for: no BatchNorm at all, a functional ``batch_norm`` call
    on activations (one on weights only, as timm's ``StdConv2d`` makes, is no BN site),
    a BN other than ``BatchNorm2d`` (e.g. ``BatchNorm1d`` in an MLP), a BN module called more
    than once, a BN without running statistics when ``running_stats`` (the modes that fold
    them need them; the GN modes take only γ and β), and a BN subclass with extra behaviour
    (e.g. timm's ``BatchNormAct2d``).
    """
    sites: list[NormSite] = []
    seen: dict[str, int] = {}
    from_input = _input_dependent(gm)
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target in _FUNCTIONAL_BN
                and node in from_input):  # (on weights only: weight standardization)  # fmt: skip
            raise ConversionError(
                f"functional batch_norm call '{node.name}': conversion handles BatchNorm2d "
                "modules only (replace the functional call by an nn.BatchNorm2d)"
            )
        module = _module(gm, node)
        if module is None or not is_norm(module):
            continue
        name = str(node.target)
        seen[name] = seen.get(name, 0) + 1
        fused = is_bn_act(module)
        frozen = is_frozen_bn(module)
        if type(module) not in (nn.BatchNorm2d, nn.SyncBatchNorm) and not fused and not frozen:
            kind = type(module).__name__
            what = ("2-D conv nets (BatchNorm2d after a Conv2d)"
                    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm3d))
                    else "plain BatchNorm2d, timm's BatchNormAct2d and frozen BNs (this "
                    "subclass adds behaviour the modes do not know)")
            raise ConversionError(f"{kind} '{name}': conversion supports {what}")  # fmt: skip
        no_stats = not frozen and (not module.track_running_stats or module.running_mean is None)
        if running_stats and no_stats:
            raise ConversionError(
                f"BatchNorm2d '{name}' has no running statistics (track_running_stats=False): it "
                "normalizes with the statistics of each batch even in eval mode, so there is no "
                "fixed transform to fold; use mode 'gn' or 'gnpn' (per-example statistics, "
                "BN's affine), or retrain it with running statistics"
            )
        src = node.args[0]
        conv = None
        if (
            isinstance(src, fx.Node)
            and (type(_module(gm, src)) in PLAIN_CONVS or is_same_conv(_module(gm, src)))
            and len(src.users) == 1
        ):
            conv = src
        users = list(node.users)
        act = None
        if not fused and len(users) == 1:
            after = users[0]  # past a stochastic-depth call: timm's BN → DropBlock2d → act
            drop = _module(gm, after)
            if drop is not None and is_stochastic_depth(drop) and len(after.users) == 1:
                after = next(iter(after.users))
            act = after if _is_activation(gm, after) else None
        sites.append(NormSite(node, name, conv, act))
    if not sites:
        raise ConversionError(
            f"{gm.__class__.__name__} has no BatchNorm2d: there is nothing to convert (conversion "
            "turns Conv→BatchNorm2d networks into batch-independent ones)"
        )
    shared = sorted(n for n, c in seen.items() if c > 1)
    if shared:
        raise ConversionError(
            f"BatchNorm module(s) {shared} are called more than once; conversion needs one "
            "BatchNorm2d module per normalization site"
        )
    convs = [s.conv for s in sites if s.conv is not None]
    for conv in convs:
        uses = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == conv.target)
        if uses > 1:
            raise ConversionError(
                f"Conv2d '{conv.target}' is called {uses} times; folding a BatchNorm into it "
                "needs a conv module used once"
            )
        reads = [str(n.target) for n in gm.graph.nodes
                 if n.op == "get_attr" and str(n.target).startswith(f"{conv.target}.")]  # fmt: skip
        if reads:
            raise ConversionError(
                f"Conv2d '{conv.target}' also has {', '.join(reads)} read directly by the "
                "forward (a tied weight); replacing the conv would change that use too, so "
                "conversion needs a conv whose parameters only it uses"
            )
    return sites


def is_bn_act(module: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` (or ``FrozenBatchNormAct2d``): BatchNorm2d → ``drop`` → ``act``
    in one module (recognised by class and its two submodules; timm is not imported)."""
    kind = type(module).__name__
    return (
        (
            (isinstance(module, nn.BatchNorm2d) and kind == "BatchNormAct2d")
            or (kind == "FrozenBatchNormAct2d" and is_frozen_bn(module))
        )
        and isinstance(getattr(module, "drop", None), nn.Module)
        and isinstance(getattr(module, "act", None), nn.Module)
    )


def describe_input(gm: fx.GraphModule, site: NormSite) -> str:
    """What feeds a BN (for error messages)."""
    src = site.bn.args[0]
    return _describe(gm, src) if isinstance(src, fx.Node) else repr(src)


def conv_depths(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """For each node, the most convolution calls on any path from a graph input to it."""
    depth: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        d = max((depth[i] for i in inputs), default=0)
        if isinstance(_module(gm, node), nn.modules.conv._ConvNd):
            d += 1
        depth[node] = d
    return depth


def find_residual_adds(gm: fx.GraphModule) -> list[ResidualAdd]:
    """Every residual ``branch + skip`` of ``gm`` in graph order (see the module docstring)."""
    depth = conv_depths(gm)
    adds = []
    for node in gm.graph.nodes:
        is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
            node.op == "call_method" and node.target in ("add", "add_")
        )
        if not is_add or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or depth[a] == depth[b]:
            continue
        branch, skip = (a, b) if depth[a] > depth[b] else (b, a)
        adds.append(ResidualAdd(node, branch, skip))
    return adds


def last_linear(gm: fx.GraphModule) -> str | None:
    """Qualified name of the last ``nn.Linear`` called in ``gm`` (the classifier), or None."""
    found = None
    for node in gm.graph.nodes:
        if isinstance(_module(gm, node), nn.Linear):
            found = str(node.target)
    return found
