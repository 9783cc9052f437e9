"""normfree: normalizer-free deep networks in PyTorch.

NF-ResNets and NFNets (Brock et al. 2021a, 2021b), Adaptive Gradient Clipping, signal
propagation analysis, and the batch-independent baselines (Fixup, SkipInit, ReZero, WS+GN,
Mean Shift Rejection, Proxy Normalization) with BN for comparison.
"""

from normfree._version import __version__
from normfree.checkpoints import load_pretrained, save_model
from normfree.convert import convert_model, load_converted, save_converted
from normfree.models import count_flops, count_params, create_model, list_models
from normfree.models.registry import set_weights_loader

set_weights_loader(load_pretrained)  # create_model(pretrained=True) reads files through it
del set_weights_loader

__all__ = [
    "__version__",
    "convert_model",
    "count_flops",
    "count_params",
    "create_model",
    "list_models",
    "load_converted",
    "load_pretrained",
    "save_converted",
    "save_model",
]
