"""``convert_model``: a trained BatchNorm network → a batch-independent one with its weights.

The result is a :class:`ConvertedModel`: a plain ``nn.Module`` (its traced, rewritten graph in
``.net``) that declares what normfree's training and analysis need (classifier = the last
``nn.Linear`` of the graph, no-decay parameters, ``meta``) and carries a JSON description of how
to rebuild it (source architecture + mode + options), so that :func:`save_converted` writes only
tensors and that description; :func:`load_converted` rebuilds the architecture and loads the
tensors without unpickling anything. See :mod:`normfree.convert.modes` for the maths.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn

from normfree.checkpoints.errors import CheckpointError, UnsafePickleError
from normfree.checkpoints.io import (
    atomic_save,
    load_tensors,
    load_torch_file,
    load_trusted_pickle,
    safetensors_metadata,
    save_safetensors,
)
from normfree.checkpoints.state_dict import compare_state_dict, load_state_dict_checked
from normfree.console import with_article
from normfree.convert.graph import (
    ConversionError,
    keep_train_time_regularizers,
    last_linear,
    trace,
)
from normfree.convert.modes import (
    MODES,
    ConvertOptions,
    add_residual_gains,
    calibrate_nf,
    mark_residual_outputs,
    replace_norms,
)
from normfree.convert.sources import build_source, check_file_source, infer_source
from normfree.models.base import ModelMeta

__all__ = [
    "CONVERTED_FORMAT",
    "CONVERTED_PREFIX",
    "ConversionReport",
    "ConvertedModel",
    "build_converted",
    "convert_model",
    "is_converted_file",
    "load_converted",
    "measure_conversion",
    "save_converted",
]

CONVERTED_FORMAT = "normfree.converted"
CONVERTED_PREFIX = "converted:"  # `normfree train model=converted:PATH`
_DESCRIBED = ("version", "mode", "source", "options")  # what a description must hold


@dataclass
class ConversionReport:
    """How a conversion went. The error fields compare the converted model with the BN model in
    eval mode on the example input (None without one). In the NF mode that input is also the
    calibration data, so the error on other inputs is larger (measure it there with
    :func:`measure_conversion`).

    Attributes:
        mode: the conversion mode.
        norms: BatchNorm layers replaced; ``affine``: of those, kept as a per-channel affine.
        residuals: residual branches found (each given a gain in the BN-free and NF modes).
        calibrated: whether the NF biases were calibrated on example data.
        examples: number of example inputs compared.
        max_abs_diff: ``max |y − y_BN|`` over the logits.
        rel_error: ``‖y − y_BN‖ / ‖y_BN‖`` (Frobenius norms over the batch).
        top1_agreement: fraction of examples whose argmax agrees (2-D outputs only).
        dropped: modules holding parameters that the traced (eval-mode) forward never calls,
            e.g. auxiliary heads used only in training: the converted model has no copy.
        regularizers: dropout and stochastic-depth calls of the converted model, each active
            in ``train()`` only, as in the source
            (:func:`normfree.convert.graph.keep_train_time_regularizers`).
    """

    mode: str
    norms: int
    affine: int
    residuals: int
    calibrated: bool
    examples: int = 0
    max_abs_diff: float | None = None
    rel_error: float | None = None
    top1_agreement: float | None = None
    dropped: list[str] = field(default_factory=list)
    regularizers: int = 0

    def summary(self) -> str:
        text = (
            f"mode {self.mode}: {self.norms} BatchNorm replaced ({self.affine} as affine), "
            f"{self.residuals} residual branches"
        )
        if self.mode == "nf":
            text += ", biases " + ("calibrated" if self.calibrated else "not calibrated")
        if self.rel_error is not None:
            text += (
                f"; on {self.examples} examples vs the BN model (eval): relative logit error "
                f"{self.rel_error:.3g}, max |diff| {self.max_abs_diff:.3g}"
            )
            if self.top1_agreement is not None:
                text += f", top-1 agreement {100 * self.top1_agreement:.1f}%"
        if self.regularizers:
            text += f"; {self.regularizers} dropout / stochastic-depth calls kept for train()"
        if self.dropped:
            text += (
                f"; not converted, because the eval-mode forward never calls them (so the "
                f"converted model has none): {', '.join(self.dropped)}"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConvertedModel(nn.Module):
    """A converted network: ``forward(x) = net(x)`` with ``net`` the rewritten ``fx`` graph.

    Declares, like :class:`normfree.models.NormFreeModel`: ``meta`` (``recipe={"agc": True}``,
    no batch statistics), ``classifier_parameter_names()`` (the last ``nn.Linear`` of the
    graph: AGC leaves it unclipped), ``no_weight_decay_names()`` (tensors with ndim ≤ 1),
    ``lr_scale``, ``num_classes``, ``in_chans`` and ``analysis_points`` (an ``nn.Identity``
    after each residual add: the residual stream, for ``normfree spp``). ``description``
    rebuilds it.
    """

    def __init__(self, net: fx.GraphModule, description: dict[str, Any]) -> None:
        super().__init__()
        self.net = net
        self.description = description
        self.report: ConversionReport | None = None
        # residual-stream outputs for normfree spp / diagnose (set by convert_model)
        self.analysis_points: list[str] | None = None
        self.in_chans = int(description["in_chans"])
        self._classifier = last_linear(net)
        size = description.get("image_size") or 224
        source = str(description.get("source") or "module").split(":")[-1]
        mode = description["mode"]
        self.meta = ModelMeta(
            name=f"{source}-{mode}", family=f"converted_{mode}", train_size=size,
            test_size=size, uses_batch_stats=False, recipe={"agc": True},
            paper="converted from a BatchNorm network (docs/convert.md)",
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @property
    def mode(self) -> str:
        return str(self.description["mode"])

    def get_classifier(self) -> nn.Module | None:
        return None if self._classifier is None else self.net.get_submodule(self._classifier)

    @property
    def num_classes(self) -> int | None:
        """Outputs of the last ``nn.Linear`` (the classifier); None without one."""
        fc = self.get_classifier()
        return int(fc.out_features) if isinstance(fc, nn.Linear) else None

    def classifier_parameter_names(self) -> list[str]:
        fc = self.get_classifier()
        if fc is None:
            return []
        return [f"net.{self._classifier}.{n}" for n, _ in fc.named_parameters()]

    def no_weight_decay_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim <= 1}

    def lr_scale(self, name: str) -> float:
        return 1.0

    def residual_blocks(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(())

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, source={self.description.get('source')!r}"


def _as_batch(example_input: Tensor | Sequence[Tensor] | None) -> Tensor | None:
    if example_input is None:
        return None
    if isinstance(example_input, Tensor):
        batch = example_input
    else:
        batches = list(example_input)
        if not batches or not all(isinstance(b, Tensor) and b.dim() == 4 for b in batches):
            raise ConversionError(
                "example_input must be an image batch (N, C, H, W) or a list of them"
            )
        if len({tuple(b.shape[1:]) for b in batches}) > 1:
            shapes = sorted({str(list(b.shape[1:])) for b in batches})
            raise ConversionError(
                f"the example_input batches have different (C, H, W): {', '.join(shapes)}; "
                "give images of one size (resize or crop them as the model was evaluated)"
            )
        batch = torch.cat(batches)
    if batch.dim() != 4:
        raise ConversionError(
            f"example_input must be an image batch (N, C, H, W), got shape {list(batch.shape)}"
        )
    return batch


def _in_chans(gm: fx.GraphModule) -> int:
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, nn.modules.conv._ConvNd):
                return int(module.in_channels)
    return 3


@torch.no_grad()
def measure_conversion(
    reference: nn.Module, converted: nn.Module, example: Tensor
) -> dict[str, float | None]:
    """``max_abs_diff``, ``rel_error`` and ``top1_agreement`` of ``converted`` against
    ``reference`` on ``example`` (both run in eval mode; their modes are restored)."""
    modes = [(m, m.training) for m in (reference, converted)]
    try:
        reference.eval()
        converted.eval()
        ref, out = reference(example), converted(example)
    finally:
        for m, training in modes:
            m.train(training)
    if not isinstance(ref, Tensor):
        raise ConversionError(
            f"the model returns {with_article(type(ref).__name__)}, not a tensor: "
            "conversion measures models whose output is one tensor (wrap the model to return it)"
        )
    ref, out = ref.double(), out.double()
    diff = out - ref
    top1 = None
    if ref.dim() == 2:
        top1 = float((out.argmax(1) == ref.argmax(1)).double().mean())
    return {
        "max_abs_diff": float(diff.abs().max()),
        "rel_error": float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref)),
        "top1_agreement": top1,
    }


def convert_model(
    model: nn.Module,
    to: str = "bn_free",
    example_input: Tensor | Sequence[Tensor] | None = None,
    *,
    source: str | None = None,
    source_kwargs: dict[str, Any] | None = None,
    options: ConvertOptions | None = None,
    **option_kwargs: Any,
) -> ConvertedModel:
    """Convert a BatchNorm network into a batch-independent one that keeps its weights.

    Args:
        model: any ``nn.Module`` with Conv2d→BatchNorm2d(→activation) patterns that torch.fx
            can trace (torchvision ResNet/ResNeXt/MobileNet, timm ResNets, normfree BN models).
            It is not modified; the BN running statistics are used (eval-mode semantics).
        to: ``"bn_free"`` (exact), ``"nf"``, ``"gn"`` or ``"gnpn"`` (:data:`MODES`,
            :mod:`normfree.convert.modes`).
        example_input: an image batch (or a list of batches) from the data: calibrates the NF
            mode's biases and measures the conversion error (:attr:`ConvertedModel.report`).
        source / source_kwargs: how to rebuild the architecture for :func:`save_converted`
            (``"torchvision:resnet18"``, ``"timm:resnet50"``, ``"normfree:NAME"``,
            ``"pkg.module:factory"``); inferred for normfree models.
        options / option_kwargs: :class:`ConvertOptions` (``standalone_bn``,
            ``residual_alpha``, ``max_groups``).

    Returns:
        A :class:`ConvertedModel` in eval mode, with ``report`` (a :class:`ConversionReport`).

    Raises:
        ConversionError: untraceable model, no BN, BN the mode cannot handle (the message names
            the module and what the mode supports).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    if type(model).__name__ == "OptimizedModule":  # no public type for torch.compile's wrapper
        raise ConversionError(
            "cannot convert a model returned by torch.compile: convert the module you passed to "
            "torch.compile and compile the converted model (model.compile(), which compiles in "
            "place, keeps a model convertible)"
        )
    if options is None:
        options = ConvertOptions(**option_kwargs)
    elif option_kwargs:
        raise TypeError("pass either options= or option keywords, not both")
    if to not in MODES:
        raise ConversionError(f"unknown mode {to!r}; choose one of {sorted(MODES)}")
    example = _as_batch(example_input)
    if source is None:
        inferred = infer_source(model)
        if inferred is not None:
            source, inferred_kwargs = inferred
            source_kwargs = {**inferred_kwargs, **(source_kwargs or {})}
    # the meta's sizes are square (ModelMeta.test_size): a square example names one, else the
    # source's own size stands and the description keeps the example's (H, W) as it was
    image_size: int | None
    if example is not None and example.shape[-2] == example.shape[-1]:
        image_size = int(example.shape[-1])
    else:
        image_size = getattr(getattr(model, "meta", None), "test_size", None)
    return _convert(model, to, options, example, source, source_kwargs or {}, image_size)


def _outermost_missing(name: str, kept: set[str]) -> str:
    """The outermost module on the way to ``name`` that the traced graph does not hold."""
    parts = name.split(".")
    return next(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p not in kept)


def _convert(
    model: nn.Module,
    mode: str,
    options: ConvertOptions,
    example: Tensor | None,
    source: str | None,
    source_kwargs: dict[str, Any],
    image_size: int | None,
) -> ConvertedModel:
    work = copy.deepcopy(model).eval()
    gm = trace(work)
    regularizers = keep_train_time_regularizers(gm)
    kept = {name for name, _ in gm.named_modules()}
    dropped = [name for name, m in work.named_modules() if name and name not in kept
               and any(True for _ in m.parameters(recurse=False))]  # fmt: skip
    folded, norms, affine = replace_norms(gm, mode, options)
    if mode == "nf" and example is not None:
        calibrate_nf(gm, folded, example, options.nf_fit, options.nf_shrinkage)
    add_residual_gains(gm, mode, options)
    outputs = mark_residual_outputs(gm)  # one per residual add, in every mode
    description = {
        "format": CONVERTED_FORMAT,
        "version": 1,
        "source": source,
        "source_kwargs": source_kwargs,
        "mode": mode,
        "options": options.to_dict(),
        "in_chans": _in_chans(gm),
        "image_size": image_size,
    }
    if example is not None:  # the (H, W) it was calibrated and measured at
        description["example_size"] = [int(example.shape[-2]), int(example.shape[-1])]
    converted = ConvertedModel(gm, description).eval()
    converted.analysis_points = [f"net.{n}" for n in outputs] or None
    report = ConversionReport(
        mode, norms, affine, len(outputs), bool(folded) and example is not None
    )
    report.dropped = sorted({_outermost_missing(name, kept) for name in dropped})
    report.regularizers = regularizers
    if example is not None:
        reference = copy.deepcopy(model).eval()
        report.examples = int(example.shape[0])
        for key, value in measure_conversion(reference, converted, example).items():
            setattr(report, key, value)
    converted.report = report
    return converted


def _rebuild(description: dict[str, Any]) -> ConvertedModel:
    """The converted model a description names, with the source's random weights (structure
    only: no calibration)."""
    source = build_source(description["source"], description.get("source_kwargs"))
    return _convert(
        source, description["mode"], ConvertOptions.from_dict(description["options"]), None,
        description["source"], description.get("source_kwargs") or {},
        description.get("image_size"),
    )  # fmt: skip


def _skeleton(description: dict[str, Any]) -> ConvertedModel:
    """The converted model a description names, built on the meta device (no memory spent on
    weights that the file or the model at hand must fill), or, for a builder that computes with
    tensor values while it builds (torchvision's RegNets derive their widths with
    ``torch.round(...).tolist()``, which the meta device cannot run), on the default device."""
    try:
        with torch.device("meta"):
            return _rebuild(description)
    except (ConversionError, NotImplementedError, RuntimeError):
        if torch.get_default_device().type == "meta":
            raise
        return _rebuild(description)  # a real error fails here again, and is reported


def _check_rebuilds(model: ConvertedModel) -> None:
    """Refuse to describe ``model`` by a source that does not rebuild it: the description is
    rebuilt on the meta device and must give the same tensors, modules and graph."""
    desc = model.description
    spec = f"{desc['source']!r} with {desc.get('source_kwargs') or {}}"
    fix = ("pass convert_model(..., source=..., source_kwargs=...) with every option the model "
           "was built with, or save with allow_pickle=True (a pickled module)")  # fmt: skip
    try:
        rebuilt = _skeleton(desc)
    except (ConversionError, CheckpointError, ValueError, TypeError) as e:
        raise ConversionError(f"the source {spec} cannot be rebuilt ({e}); {fix}") from e
    report = compare_state_dict(rebuilt, model.state_dict())
    wrong = report.differences
    if wrong:
        what = f"{len(wrong)} tensors differ: {', '.join(wrong[:3])}"
    elif repr(rebuilt.net) != repr(model.net) or rebuilt.net.code != model.net.code:
        what = ("its layers or their settings differ (e.g. a stride, a padding, or a dropout "
                "or stochastic-depth rate, such as timm's drop_path_rate)")  # fmt: skip
    else:
        return
    raise ConversionError(f"the source {spec} does not rebuild this model ({what}); {fix}")


def save_converted(
    model: ConvertedModel, path: str | os.PathLike[str], *, allow_pickle: bool = False
) -> None:
    """Write ``model`` atomically: ``.safetensors`` (tensors; the description in the metadata) or
    a torch file readable with ``weights_only=True`` (``{"format", "description",
    "state_dict"}``). The description must rebuild the model: its source spec is built on the
    meta device and converted again, and a source that gives other tensors, layers or layer
    settings (a model built with options the spec does not record) is refused. A model whose
    architecture has no such spec (converted from a module object that normfree cannot
    rebuild) is only written as a full pickled module, with ``allow_pickle=True`` (loading it
    then needs ``trust_pickle=True``)."""
    if not isinstance(model, ConvertedModel):
        raise TypeError(f"expected a ConvertedModel, got {type(model).__name__}")
    desc = model.description
    if desc.get("source") is not None:
        try:
            _check_rebuilds(model)
        except ConversionError:
            if not allow_pickle or Path(path).suffix == ".safetensors":
                raise
            desc = {**desc, "source": None}  # not rebuildable: written as a pickled module
    if desc.get("source") is None:
        if not allow_pickle:
            raise ConversionError(
                "this converted model has no source architecture to rebuild it from: pass "
                "source='torchvision:resnet18' (or timm:NAME, normfree:NAME, module:factory) to "
                "convert_model, or allow_pickle=True to write a full pickled module"
            )
        if Path(path).suffix == ".safetensors":
            raise ConversionError("a pickled module cannot be written as .safetensors; use .pt")
        atomic_save(model, path)
        return
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if Path(path).suffix == ".safetensors":
        save_safetensors(state, path, metadata={"format": CONVERTED_FORMAT,
                                                "description": json.dumps(desc)})  # fmt: skip
    else:
        atomic_save({"format": CONVERTED_FORMAT, "description": desc, "state_dict": state}, path)


def _read(path: Path, trust_pickle: bool) -> tuple[dict[str, Any] | None, Any]:
    """``(description, state_dict)``, or ``(None, module)`` for a trusted pickled module."""
    if path.suffix == ".safetensors":
        meta = safetensors_metadata(path)
        if meta.get("format") != CONVERTED_FORMAT:
            raise CheckpointError(f"{path} is not a converted-model file (no {CONVERTED_FORMAT})")
        return json.loads(meta["description"]), load_tensors(path)
    try:
        obj = load_tensors(path, trust_hint="--trust-pickle (trust_pickle=True)")
    except UnsafePickleError:
        if not trust_pickle:
            raise
        obj = load_trusted_pickle(path)
        if not isinstance(obj, ConvertedModel):
            raise CheckpointError(
                f"{path} holds a {type(obj).__name__}, not a ConvertedModel"
            ) from None
        return None, obj
    if not (isinstance(obj, dict) and obj.get("format") == CONVERTED_FORMAT):
        raise CheckpointError(f"{path} is not a converted-model file (no {CONVERTED_FORMAT})")
    return obj["description"], obj["state_dict"]


def load_converted(
    path: str | os.PathLike[str], *, trust_pickle: bool = False, trust_code: bool = False
) -> ConvertedModel:
    """Rebuild a model written by :func:`save_converted` (eval mode): the source architecture
    is built from the description, converted again (structure only) and the tensors loaded
    strictly, in the dtype of the file's floating tensors. Pickled full modules load only with
    ``trust_pickle=True``; a description naming a ``package.module:factory`` other than
    normfree's own only with ``trust_code=True`` (see
    :func:`normfree.convert.sources.check_file_source`)."""
    path = Path(path)
    description, state = _read(path, trust_pickle)
    if description is None:
        return state.eval()
    if not isinstance(description, dict) or not all(k in description for k in _DESCRIBED):
        raise CheckpointError(f"{path}: its description is not a converted-model description")
    if description.get("version") != 1 or description.get("mode") not in MODES:
        raise CheckpointError(f"{path}: unsupported converted-model description {description}")
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise CheckpointError(f"{path}: its weights are not a mapping of names to tensors")
    check_file_source(description["source"], description.get("source_kwargs"), path, trust_code)
    skeleton = _skeleton(description)  # the file's tensors must fit it before they are loaded
    report = compare_state_dict(skeleton, state)
    wrong = report.differences
    if wrong:
        raise CheckpointError(
            f"{path}: its tensors do not fit the architecture its description names "
            f"({len(wrong)} differ: {', '.join(wrong[:3])}); the file is damaged or forged"
        )
    if torch.get_default_device().type == "meta":  # a skeleton was asked for (shape checks)
        return skeleton.eval()
    meta = any(t.is_meta for t in skeleton.state_dict().values())
    converted = _rebuild(description) if meta else skeleton  # (built for real already)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # a float64 (or bf16) model comes back in its own dtype, not float32
        converted.to(dtype=dtypes.pop())
    load_state_dict_checked(converted, state, strict=True, source=str(path))
    if isinstance(description.get("data"), dict):  # the training data it records (export)
        converted.description["data"] = description["data"]
    example_size = description.get("example_size")
    if isinstance(example_size, list) and len(example_size) == 2 and all(
        type(v) is int and v > 0 for v in example_size
    ):  # the (H, W) it was calibrated at, when it says so in a well-formed way
        converted.description["example_size"] = example_size
    return converted.eval()


def is_converted_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file written by :func:`save_converted` (a cheap check of the
    safetensors header, or a memory-mapped ``weights_only`` load of a torch file)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        if path.suffix == ".safetensors":
            return safetensors_metadata(path).get("format") == CONVERTED_FORMAT
        # mmap: the tensors are not read, only the small pickled structure
        obj = load_torch_file(path, mmap=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("format") == CONVERTED_FORMAT


def build_converted(
    spec: str, num_classes: int, in_chans: int, kwargs: dict[str, Any] | None = None
) -> ConvertedModel:
    """The model of ``normfree train model=converted:PATH``: the converted model in ``PATH``
    (training mode, float32), checked against the dataset's classes and channels."""
    path = spec[len(CONVERTED_PREFIX):] if spec.startswith(CONVERTED_PREFIX) else spec
    if kwargs:
        raise ValueError(
            f"a converted model takes no model options, got {sorted(kwargs)}: it trains with the "
            "dropout and stochastic-depth rates it was converted with; leave train.drop_rate, "
            "train.stochdepth_rate and model_kwargs unset"
        )
    try:
        model = load_converted(path)
    except CheckpointError as e:
        raise ValueError(str(e)) from e
    if model.num_classes is None:
        raise ValueError(f"{path} has no classifier (no nn.Linear): training needs class logits")
    if model.num_classes != num_classes or model.in_chans != in_chans:
        raise ValueError(
            f"{path} is a {model.num_classes}-class model on {model.in_chans} channels but the "
            f"dataset has {num_classes} classes and {in_chans} channels; convert a model built "
            "for this dataset"
        )
    return model.float().train()  # a float64 file trains in float32, as every model does
