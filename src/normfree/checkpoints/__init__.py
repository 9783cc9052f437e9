"""Checkpoint interop: normfree files, DeepMind's Haiku NFNet files and timm state dicts."""

from normfree.checkpoints.api import adapt_input_conv, load_pretrained, save_model
from normfree.checkpoints.deepmind import (
    deepmind_to_normfree,
    normfree_to_deepmind,
    read_haiku_file,
)
from normfree.checkpoints.errors import (
    CheckpointError,
    CheckpointMismatchError,
    UnsafePickleError,
)
from normfree.checkpoints.io import atomic_save, atomic_write_bytes, load_tensors, save_safetensors
from normfree.checkpoints.state_dict import LoadReport, compare_state_dict, load_state_dict_checked
from normfree.checkpoints.timm import is_timm_state_dict, normfree_to_timm, timm_to_normfree

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "LoadReport",
    "UnsafePickleError",
    "adapt_input_conv",
    "atomic_save",
    "atomic_write_bytes",
    "compare_state_dict",
    "deepmind_to_normfree",
    "is_timm_state_dict",
    "load_pretrained",
    "load_state_dict_checked",
    "load_tensors",
    "normfree_to_deepmind",
    "normfree_to_timm",
    "read_haiku_file",
    "save_model",
    "save_safetensors",
    "timm_to_normfree",
]
