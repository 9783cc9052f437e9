"""Export a model for deployment: fold it (:func:`prepare_for_inference`), trace it with
``torch.export`` with a dynamic batch dimension, save it as ONNX or as a ``torch.export``
program (``.pt2``), and check the saved file against the eager model before it replaces anything
at the destination.

The image size is fixed by default. With ``size_multiple=m`` the height and width are free
too, as any multiples of ``m`` from ``2m`` (:func:`total_stride`: the model's total stride,
e.g. 32). On such sizes every stage's size is exact, so TF/JAX "SAME" padding (NFNets,
NF-RegNets), whose amounts follow each stage's input size, pads alike at every size; on
arbitrary sizes ``torch.export`` cannot prove the shapes (PyTorch 2.14 raises "Constraints
violated" on the pads' parity), which is why the sizes are multiples. Inputs are normalised
``(B, C, H, W)`` float32 tensors, as in training.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfree.atomic import atomic_write_json, check_writable
from normfree.console import first_line, with_article
from normfree.deploy.inference import folded_module_counts, prepare_for_inference
from normfree.nn.eager_forms import export_trace

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportResult",
    "export_model",
    "measured_stride",
    "nearest_size",
    "sizes_text",
    "total_stride",
]

# format name -> file suffix
EXPORT_FORMATS: dict[str, str] = {"onnx": ".onnx", "pt2": ".pt2"}
_MAX_BATCH = 1 << 16
_MAX_SIZE = 1 << 13  # the largest height / width of a dynamic-size export
_MAX_MULTIPLE = _MAX_SIZE // 3  # a larger multiple leaves one size (2m) at most: nothing free


class ExportError(RuntimeError):
    """The model could not be exported, or the exported file disagrees with the eager model."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how it was checked.

    ``max_abs_diff`` is the largest difference between the saved model's outputs and the eager
    (unfolded, eval-mode) model's on a random batch whose size differs from the traced one;
    ``verified_with`` names the runtime that ran the saved file (``None``: not verified);
    ``outputs`` lists the graph's outputs in order, ``{"name", "shape"}`` with the shape's
    first entry ``"batch"`` (one ``output``, or ``output_0``, ``output_1``, … for a backbone
    returning several feature maps; a ``.pt2`` program returns them as a list in this order);
    with ``size_multiple`` (height and width free, multiples of it) a feature map's height and
    width read ``"height/R"`` and ``"width/R"`` (``R`` its reduction), and ``input_shape`` is
    the size that was traced and checked first.
    """

    path: str
    format: str
    input_shape: tuple[int, ...]
    folded: dict[str, int]
    max_abs_diff: float | None = None
    verified_with: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    size_multiple: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": 1, **asdict(self)}


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is None:
        for name, suffix in EXPORT_FORMATS.items():
            if path.suffix.lower() == suffix:
                return name
        raise ValueError(
            f"cannot tell the export format from {path.name!r}: name the file "
            f"{' or '.join('*' + s for s in EXPORT_FORMATS.values())}, "
            f"or choose the format ({', '.join(sorted(EXPORT_FORMATS))})"
        )
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {sorted(EXPORT_FORMATS)}")
    named = [name for name, suffix in EXPORT_FORMATS.items() if path.suffix.lower() == suffix]
    if named and named[0] != fmt:
        raise ValueError(
            f"format {fmt!r} but {path.name!r} has the suffix of format {named[0]!r}; name it "
            f"*{EXPORT_FORMATS[fmt]} (or another suffix), or choose format {named[0]!r}"
        )
    return fmt


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be three positive ints (C, H, W), got {shape}")
    return shape  # type: ignore[return-value]


def total_stride(model: nn.Module) -> int | None:
    """The largest reduction that ``model.feature_info`` declares (timm's convention: a list of
    dicts with ``"reduction"``; normfree's models and ``features_only`` backbones, timm's
    models), i.e. the factor by which the model shrinks an image; None where it declares none.
    Heights and widths that are multiples of it keep every stage's size exact
    (:func:`export_model`'s ``size_multiple``)."""
    infos = getattr(model, "feature_info", None)
    try:
        reductions = [int(info["reduction"]) for info in infos]  # type: ignore[union-attr]
    except (TypeError, KeyError, ValueError):
        return None
    return max(reductions) if reductions and min(reductions) > 0 else None


@torch.no_grad()
def measured_stride(model: nn.Module, in_chans: int, size: int = 64) -> int | None:
    """The factor by which ``model`` shrinks an image, measured where it declares no
    ``feature_info`` (:func:`total_stride`): a forward at ``size`` and at ``2·size`` (eval mode,
    zeros), the largest ``size / h`` over the 4-D outputs of its leaf modules whose height ``h``
    doubles with the input (a global pool's 1×1 does not, and is not a stage). None where no
    output scales with the input, or where the model does not run at both sizes."""
    heights: list[tuple[str, int]] = []  # (leaf module, output height), in call order

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                heights.append((name, int(out.shape[-2])))

        return hook

    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    ref = next(iter(model.parameters()), None)
    device, dtype = (None, None) if ref is None else (ref.device, ref.dtype)
    was_training = model.training
    handles = [m.register_forward_hook(record(name)) for name, m in leaves]
    model.eval()
    try:
        model(torch.zeros(1, in_chans, size, size, device=device, dtype=dtype))
        small = list(heights)
        heights.clear()
        model(torch.zeros(1, in_chans, 2 * size, 2 * size, device=device, dtype=dtype))
    except (RuntimeError, ValueError):  # a model of one input size has no stride to find
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if len(small) != len(heights):
        return None
    strides = [size // h for (a, h), (b, h2) in zip(small, heights)
               if a == b and h > 0 and h2 == 2 * h and size % h == 0]  # fmt: skip
    return max(strides) if strides else None


def nearest_size(size: int, size_multiple: int) -> int:
    """The size a dynamic-size export with ``size_multiple`` takes that is nearest ``size``
    (a multiple of it, at least twice it)."""
    return size_multiple * max(2, round(size / size_multiple))


def sizes_text(size_multiple: int) -> str:
    """The heights and widths a dynamic-size export takes, in words."""
    return f"H and W multiples of {size_multiple} from {2 * size_multiple} to {_MAX_SIZE}"


def _check_multiple(size_multiple: Any, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The traced input shape of a dynamic-size export: ``shape``, whose height and width must
    be multiples of ``size_multiple``, each raised to at least twice it (``torch.export``
    specialises a size whose traced value is 1)."""
    if isinstance(size_multiple, bool) or not isinstance(size_multiple, int):
        raise TypeError(f"size_multiple must be an int, got {type(size_multiple).__name__}")
    if not 1 <= size_multiple <= _MAX_MULTIPLE:
        raise ValueError(
            f"size_multiple (--dynamic-size) must be 1 to {_MAX_MULTIPLE}, got {size_multiple}"
        )
    c, h, w = shape
    if h % size_multiple or w % size_multiple:
        raise ValueError(
            f"the image size {h}x{w} is not a multiple of size_multiple={size_multiple}; "
            f"choose a size that is (e.g. {nearest_size(h, size_multiple)})"
        )
    if max(h, w) > _MAX_SIZE:
        raise ValueError(f"a dynamic-size export takes sizes up to {_MAX_SIZE}, got {h}x{w}")
    return c, max(h, 2 * size_multiple), max(w, 2 * size_multiple)


def _dynamic_shapes(size_multiple: int | None) -> tuple[dict[int, Any]]:
    """``torch.export``'s ``dynamic_shapes`` of the one input: the batch free, and with
    ``size_multiple`` the height and width too, as its multiples from twice it up to
    :data:`_MAX_SIZE` (from twice: a stage whose size may be 1 is one whose broadcasts
    ``torch.export`` cannot prove, so a program traced at a larger size asserts it is not)."""
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=_MAX_BATCH)}
    if size_multiple is not None:
        for axis, name in ((2, "height"), (3, "width")):
            free = torch.export.Dim(name, min=2, max=_MAX_SIZE // size_multiple)
            dims[axis] = free if size_multiple == 1 else size_multiple * free
    return (dims,)


def _other_size(size: int, size_multiple: int, step: int) -> int:
    """A multiple of ``size_multiple`` other than ``size`` that a dynamic-size export takes
    (from twice it up to :data:`_MAX_SIZE`), ``step`` multiples away where that is in range."""
    top = size_multiple * (_MAX_SIZE // size_multiple)
    for other in (size + step * size_multiple, size - step * size_multiple,
                  size + size_multiple, size - size_multiple):  # fmt: skip
        if 2 * size_multiple <= other <= top:
            return other
    return size  # unreachable for size_multiple <= _MAX_MULTIPLE


def _output_shape(
    out: torch.Tensor, example: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor] | None
) -> list[Any]:
    """An output's shape for the sidecar: ``"batch"`` first; with a dynamic size (``probe``:
    the output at another input size, and that input), a feature map's height and width as
    ``"height/R"`` / ``"width/R"`` (R its reduction) where they follow the input's at both
    sizes, else the fixed size (e.g. a pooled map's 1)."""
    shape: list[Any] = ["batch", *out.shape[1:]]
    if probe is not None and out.dim() == 4:
        other, other_input = probe
        for axis, name in ((2, "height"), (3, "width")):
            size, reduction = out.shape[axis], example.shape[axis] // max(out.shape[axis], 1)
            if (
                reduction * size == example.shape[axis]
                and other.dim() == 4
                and reduction * other.shape[axis] == other_input.shape[axis]
            ):
                shape[axis] = name if reduction == 1 else f"{name}/{reduction}"
    return shape


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode; every submodule's own mode is restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _output_list(out: Any) -> list[torch.Tensor]:
    """A model's output as the list of tensors an exported graph returns: one tensor, or each
    tensor of a list / tuple (a ``features_only`` backbone's feature maps)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise ExportError(
        f"the model returns {with_article(type(out).__name__)}; export takes a model that "
        "returns a tensor or a list / tuple of tensors (wrap it to return one)"
    )


def _cannot_run(who: str, x: torch.Tensor, e: Exception, path: Path | None = None) -> ExportError:
    """One line: ``who`` fails on ``x``'s shape, with the first line of ``e`` (a ``.pt2``
    program's guard of symbolic sizes can run to thousands of characters: cut at 200) and,
    for a saved file that failed its check, that nothing was written to ``path``."""
    said = first_line(e)
    said = said if len(said) <= 200 else said[:200] + "…"
    tail = "" if path is None else f"; nothing was written to {path}"
    return ExportError(
        f"{who} does not run on an input of shape {tuple(x.shape)}: {type(e).__name__}: "
        f"{said}{tail}"
    )


def _run_on(
    run: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    who: str = "the model",
    path: Path | None = None,
) -> list[torch.Tensor]:
    """``run(x)``'s outputs as a list (:func:`_output_list`), without autograd; an
    :class:`ExportError` naming the input's shape where ``run`` cannot take it
    (:func:`_cannot_run`)."""
    try:
        with torch.no_grad():
            return _output_list(run(x))
    except ExportError:
        raise
    except Exception as e:  # e.g. a .pt2 program's guard: a size outside what it takes
        raise _cannot_run(who, x, e, path) from e


def _eager_output(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The unfolded model's eval-mode outputs on its own device and in its own floating dtype
    (a float64 model is checked in float64), as CPU float32."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else x.dtype
    with torch.no_grad(), _eval_mode(model):
        out = _output_list(model(x.to(device=device, dtype=dtype)))
    return [t.float().cpu() for t in out]


class _SizeGuard(nn.Module):
    """``model`` behind a check that the height and width are multiples of ``multiple``, for an
    ONNX file of a dynamic-size export: ONNX has no assertion, and its graph, traced on those
    multiples, pads each SAME conv by amounts that hold only for them. The check is a reshape
    to ``(B, C, H // m, m, W // m, m)`` and back: free, and on any other size the runtime
    refuses it (onnxruntime: "The input tensor cannot be reshaped to the requested shape")
    instead of returning wrong outputs."""

    def __init__(self, model: nn.Module, multiple: int) -> None:
        super().__init__()
        self.model = model
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> Any:
        b, c, h, w = x.shape
        m = self.multiple
        return self.model(x.reshape(b, c, h // m, m, w // m, m).reshape(b, c, h, w))


def _trace_error(
    e: Exception,
    size_multiple: int | None,
    model: nn.Module,
    failed: str = "torch.export could not trace the model",
) -> ExportError:
    """The error of a failed trace (``failed``: what failed, for any other cause); for a
    dynamic size whose shapes ``torch.export`` could not prove, one line naming the fix."""
    if size_multiple is not None and "Constraints violated" in str(e):
        stride = total_stride(model)
        fix = (
            f"choose a multiple of {stride}, the model's total stride"
            if stride is not None and stride % size_multiple == 0 and stride != size_multiple
            else "choose a multiple of the model's total stride"
        )
        return ExportError(
            f"torch.export cannot prove the model's shapes for every multiple of "
            f"{size_multiple}: {fix}, or export at a fixed size"
        )
    return ExportError(f"{failed}: {type(e).__name__}: {e}")


def _stride_advice(
    e: ExportError, size_multiple: int | None, model: nn.Module
) -> ExportError | None:
    """``e``, the failed check of a dynamic-size export at its second size, with the fix where
    ``size_multiple`` is no multiple of the model's total stride (unknown counts as no): the
    program, traced at one size, may hold e.g. one parity of a stage's size (``--dynamic-size 3``
    of a stride-4 ResNet refused 15×18 with a guard); None otherwise (``e`` is a bug to report)."""
    stride = total_stride(model) if size_multiple is not None else None
    if size_multiple is None or (stride is not None and size_multiple % stride == 0):
        return None
    stride_text = "the model's total stride" if stride is None else f"{stride}, its total stride"
    return ExportError(
        f"{e}; the saved model does not take every multiple of {size_multiple}: choose a "
        f"multiple of {stride_text} (--dynamic-size), or export at a fixed size"
    )


def _trace(
    model: nn.Module, example: torch.Tensor, size_multiple: int | None = None
) -> torch.export.ExportedProgram:
    try:
        with export_trace():
            return torch.export.export(
                model, (example,), dynamic_shapes=_dynamic_shapes(size_multiple)
            )
    except Exception as e:  # torch raises many types here; all mean "cannot trace"
        raise _trace_error(e, size_multiple, model) from e


@contextlib.contextmanager
def _exporter_logs_quiet() -> Iterator[None]:
    """Silence the ONNX exporter's own log lines (a failed opset conversion logs a traceback and
    goes on at opset 18); what matters is checked on the result and reported as an error."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _output_names(count: int) -> list[str]:
    """The ONNX graph's output names: ``output``, or ``output_0``, ``output_1``, … for a model
    returning several tensors."""
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _save_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int | None,
    outputs: int = 1,
    size_multiple: int | None = None,
) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError as e:
        raise ImportError(
            'ONNX export needs onnx and onnxscript: pip install "normfree[export]"'
        ) from e
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not 1 <= opset <= newest:
        raise ExportError(
            f"opset {opset} does not exist (this onnx knows 1 to {newest}); choose one up to "
            f"{newest} or leave --opset out"
        )
    try:
        with export_trace(), _exporter_logs_quiet():
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=["input"],
                output_names=_output_names(outputs),
                dynamic_shapes=_dynamic_shapes(size_multiple), opset_version=opset,
                verbose=False,
            )  # fmt: skip
    except Exception as e:
        raise _trace_error(e, size_multiple, model, "ONNX export failed") from e
    written = dict(program.model.opset_imports).get("")
    if opset is not None and written != opset:
        raise ExportError(
            f"the ONNX exporter cannot write this model at opset {opset} (it converts from "
            f"opset {written} and that failed); choose a newer opset or leave --opset out"
        )
    program.save(path)  # weights > 2 GB go to an external-data file beside it


def _onnx_runner(path: Path) -> tuple[Callable[[torch.Tensor], list[torch.Tensor]], str] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        session: Any = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = "onnxruntime"
    else:
        try:
            from onnx.reference import ReferenceEvaluator
        except ImportError:
            return None
        session, name = ReferenceEvaluator(str(path)), "onnx.reference"
    return (lambda x: [torch.from_numpy(y) for y in session.run(None, {"input": x.numpy()})]), name


def _pt2_runner(path: Path) -> tuple[Callable[[torch.Tensor], list[torch.Tensor]], str]:
    module = torch.export.load(str(path)).module()
    return (lambda x: _output_list(module(x))), "torch.export.load"


def _verify(
    run: Callable[[torch.Tensor], Any],
    reference: list[torch.Tensor],
    check: torch.Tensor,
    atol: float,
    path: Path,
) -> float:
    """Run the saved model on ``check``: each of its outputs must have the eager output's shape
    and lie within ``atol·(1 + max|output|)`` of it (each output against its own scale);
    returns the largest difference."""
    got = _run_on(run, check, "the exported model", path)
    shapes = [tuple(t.shape) for t in got]
    expected = [tuple(t.shape) for t in reference]
    if shapes != expected:
        def txt(s: list[tuple[int, ...]]) -> str:
            return str(s[0]) if len(s) == 1 else ", ".join(map(str, s))

        raise ExportError(
            f"the exported model returns shape {txt(shapes)} for an input of shape "
            f"{tuple(check.shape)}, the eager model {txt(expected)}"
        )
    largest = 0.0
    for out, ref in zip(got, reference):
        diff = (out - ref).abs().max().item() if ref.numel() else 0.0
        largest = max(largest, diff)
        tol = atol * (1.0 + (ref.abs().max().item() if ref.numel() else 0.0))
        if not diff <= tol:
            raise ExportError(
                f"the exported model differs from the eager model by {diff:.3g} "
                f"(> {tol:.3g}) on an input of shape {tuple(check.shape)}; nothing was "
                f"written to {path}"
            )
    return largest


def export_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    format: str | None = None,
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
    size_multiple: int | None = None,
) -> ExportResult:
    """Fold ``model`` and export it to ``path`` (``.onnx`` or ``.pt2``) for inputs of shape
    ``(B, *input_shape)`` with any batch size ``B``. The model returns one tensor (ONNX output
    ``output``) or a list / tuple of tensors, e.g. a ``features_only`` backbone's feature maps
    (ONNX outputs ``output_0``, ``output_1``, …; a ``.pt2`` program returns the list).

    ``size_multiple=m`` frees the height and width too: the saved model takes any multiple of
    ``m`` from ``2m`` to 8192 for each (``m`` = :func:`total_stride` of the model, e.g. 32,
    keeps every stage's size exact; ``input_shape``'s height and width must be multiples of
    ``m``, and are traced at ``2m`` at least).

    With ``verify`` (default) the saved file is loaded back (onnxruntime, else the ``onnx``
    reference evaluator; ``torch.export.load`` for ``.pt2``) and run on a random batch of 3
    (with ``size_multiple``, also on a batch of 2 at another height and width); its outputs
    must match the eager model's within ``atol·(1 + max|output|)`` (each output), or
    :class:`ExportError` is raised and ``path`` is left as it was. The file only appears at
    ``path`` once it is complete (and checked). ``metadata`` (e.g. input normalisation and
    class names) is stored with the result in a ``PATH.json`` sidecar.

    The exported graph runs on CPU in float32; ``model`` itself is not modified.
    """
    path = Path(path)
    fmt = _format_of(path, format)
    if opset is not None and fmt != "onnx":
        raise ExportError(f"an opset ({opset}) is for ONNX files, not {fmt}: leave --opset out")
    shape = _check_shape(input_shape)
    if size_multiple is not None:
        shape = _check_multiple(size_multiple, shape)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sidecar = path.with_name(path.name + ".json")
    check_writable(path, sidecar)  # before the work: both are replaced only if both can be
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *shape, generator=gen)  # batch 2: 1 would be specialised
    checks = [torch.randn(3, *shape, generator=gen)]
    if size_multiple is not None:  # another height and width, the two apart
        c, h, w = shape
        other = (_other_size(h, size_multiple, 1), _other_size(w, size_multiple, 2))
        checks.append(torch.randn(2, c, *other, generator=gen))
    try:  # the scales are recorded on an input of the shape exported
        folded = prepare_for_inference(model, example).cpu().float()
    except (RuntimeError, ValueError) as e:
        raise _cannot_run("the model", example, e) from e
    out_list = _run_on(folded, example)
    outputs = len(out_list)
    # the eager outputs the saved file is checked against; with a free size, the second
    # check's also tell which output sizes follow the input's
    references = (
        [_run_on(functools.partial(_eager_output, model), c) for c in checks]
        if verify or size_multiple is not None
        else []
    )
    probes: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * outputs
    if size_multiple is not None and len(references[1]) == outputs:
        probes = [(t, checks[1]) for t in references[1]]
    result = ExportResult(
        str(path), fmt, shape, folded_module_counts(model), metadata=dict(metadata or {}),
        outputs=[{"name": name, "shape": _output_shape(t, example, probe)}
                 for name, t, probe in zip(_output_names(outputs), out_list, probes)],
        size_multiple=size_multiple,
    )  # fmt: skip

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        if fmt == "onnx":
            guarded = folded
            if size_multiple is not None and size_multiple > 1:
                guarded = _SizeGuard(folded, size_multiple).eval()
            _save_onnx(guarded, example, staged, opset, outputs, size_multiple)
        else:
            torch.export.save(_trace(folded, example, size_multiple), str(staged))
        if verify:
            runner = _onnx_runner(staged) if fmt == "onnx" else _pt2_runner(staged)
            if runner is not None:
                run, result.verified_with = runner
                diffs = []
                for check, reference in zip(checks, references):
                    try:
                        diffs.append(_verify(run, reference, check, atol, path))
                    except ExportError as e:  # the other size of a multiple not of the stride
                        advised = _stride_advice(e, size_multiple, model) if diffs else None
                        if advised is None:
                            raise
                        raise advised from e
                result.max_abs_diff = max(diffs)
        staged_sidecar = atomic_write_json(staging / sidecar.name, result.to_dict())
        for extra in sorted(staging.iterdir()):  # external-data files first, the model last
            if extra.name not in (path.name, sidecar.name):
                os.replace(extra, path.parent / extra.name)
        os.replace(staged, path)
        os.replace(staged_sidecar, sidecar)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
