"""Deployment: fold a model into its inference form and export it (ONNX, ``torch.export``).

See :func:`prepare_for_inference` and :func:`export_model`; ``normfree export`` is the command.
"""

from normfree.deploy.export import (
    EXPORT_FORMATS,
    ExportError,
    ExportResult,
    export_model,
    measured_stride,
    total_stride,
)
from normfree.deploy.inference import folded_module_counts, prepare_for_inference

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportResult",
    "export_model",
    "folded_module_counts",
    "measured_stride",
    "prepare_for_inference",
    "total_stride",
]
