"""Convert a trained BatchNorm network into a batch-independent one that keeps its weights:
BN-free (exact), normalizer-free (scaled WS), WS+GN and GN+Proxy-Norm (docs/convert.md)."""

from normfree.convert.api import (
    CONVERTED_FORMAT,
    CONVERTED_PREFIX,
    ConversionReport,
    ConvertedModel,
    build_converted,
    convert_model,
    is_converted_file,
    load_converted,
    measure_conversion,
    save_converted,
)
from normfree.convert.graph import ConversionError, find_norms, find_residual_adds, trace
from normfree.convert.layers import ChannelAffine, FeatureDropout
from normfree.convert.modes import MODES, ConvertOptions
from normfree.convert.sources import build_source, trusting_code

__all__ = [
    "CONVERTED_FORMAT",
    "CONVERTED_PREFIX",
    "MODES",
    "ChannelAffine",
    "ConversionError",
    "ConversionReport",
    "ConvertOptions",
    "ConvertedModel",
    "FeatureDropout",
    "build_converted",
    "build_source",
    "convert_model",
    "find_norms",
    "find_residual_adds",
    "is_converted_file",
    "load_converted",
    "measure_conversion",
    "save_converted",
    "trace",
    "trusting_code",
]
