"""DeepMind's official NFNet weight files (``F0_haiku.npz`` … ``F6_haiku.npz``).

Despite the suffix these files are pickles (written with ``dill``) of a two-level mapping
``{module_path: {param_name: numpy array}}`` with Haiku module paths such as
``NFNet/~/nf_block_3/~/conv1b`` (Brock et al. 2021b, official ``utils.load_haiku_file``).
Unpickling can execute code, so :func:`read_haiku_file` refuses unless the caller opts in with
``trust_pickle=True``; even then it uses a restricted unpickler that only rebuilds numpy arrays
(also as dill writes them, through ``dill._dill._create_array``, whose stand-in accepts numpy's
reconstructor only) and plain/Haiku mappings (Haiku's mapping classes become dicts; neither
haiku nor dill is imported).
A real ``.npz`` archive with flat ``module/param`` keys is read with ``allow_pickle=False``.

Layouts: conv kernels are HWIO (→ OIHW), linear weights ``(in, out)`` (→ ``(out, in)``; the
squeeze-excite linears become 1×1 convs), gains and biases ``(C,)``, ``skip_gain`` a scalar.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normfree.checkpoints.errors import CheckpointError
from normfree.models.nfnet import NFNet

__all__ = ["deepmind_to_normfree", "normfree_to_deepmind", "read_haiku_file"]

# Exact (module, name) pairs the restricted unpickler may resolve. Nothing else is looked up,
# and the check runs *before* any import, so a crafted file cannot import a module by naming it.
_ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("_codecs", "encode"),  # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1")
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"),
    ("builtins", "set"), ("builtins", "frozenset"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
})  # fmt: skip
# Haiku's / dill's mapping classes: replaced by a plain dict, never imported.
_MAPPING_GLOBALS = frozenset({
    ("haiku._src.data_structures", "FlatMapping"), ("haiku._src.data_structures", "FlatMap"),
    ("haiku.data_structures", "FlatMapping"), ("haiku.data_structures", "FlatMap"),
    ("dill._dill", "_create_namedtuple"),
})  # fmt: skip


class _MappingShim(dict):
    """Stands in for Haiku's FlatMapping/FlatMap classes when unpickling."""

    def __setstate__(self, state: Any) -> None:  # FlatMapping pickles its items as state
        if isinstance(state, Mapping):
            self.update(state)
        elif isinstance(state, (tuple, list)):
            for item in state:
                if isinstance(item, Mapping):
                    self.update(item)


def _dill_create_array(f: Any, args: Any, state: Any, npdict: Any = None) -> np.ndarray:
    """Stands in for ``dill._dill._create_array``, which dill writes for every numpy array
    (``f(*args)``, then ``__setstate__(state)``): ``f`` must be numpy's ``_reconstruct`` (the
    unpickler resolved it through the same allow-list), and an array with attributes of its
    own (``npdict``: a subclass) is refused."""
    if getattr(f, "__name__", None) != "_reconstruct" or not str(
        getattr(f, "__module__", "")
    ).startswith("numpy"):
        raise pickle.UnpicklingError(f"dill array rebuilt by {f!r}, not numpy's _reconstruct")
    if npdict:
        raise pickle.UnpicklingError("a dill array with attributes (an ndarray subclass)")
    array = f(*args)
    if type(array) is not np.ndarray:
        raise pickle.UnpicklingError(f"dill array of type {type(array).__name__}")
    array.__setstate__(state)
    return array


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the exact pairs of ``_ALLOWED_GLOBALS`` (and the Haiku mapping shims and
    dill's array builder); the name is checked before anything is imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _MAPPING_GLOBALS:
            return _MappingShim
        if (module, name) == ("dill._dill", "_create_array"):
            return _dill_create_array
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: a Haiku weight file only holds numpy arrays "
            "in nested mappings"
        )


def read_haiku_file(
    path: str | os.PathLike[str], trust_pickle: bool = False
) -> dict[str, dict[str, np.ndarray]]:
    """Read an official weight file into ``{module_path: {param: array}}``.

    Args:
        path: ``F0_haiku.npz`` etc.
        trust_pickle: must be True for the official files, because they are pickles: loading a
            pickle from an untrusted source can run arbitrary code. normfree still restricts
            what the pickle may construct, but only opt in for files whose origin you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    tree: dict[str, dict[str, np.ndarray]] = {}
    with open(path, "rb") as f:
        head = f.read(4)
    if head in (b"PK\x03\x04", b"PK\x05\x06") and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is a corrupt or truncated .npz (zip) archive; restore it from a copy"
        )
    if zipfile.is_zipfile(path):
        try:
            with np.load(path, allow_pickle=False) as npz:
                for key in npz.files:
                    module, _, param = key.rpartition("/")
                    tree.setdefault(module, {})[param] = npz[key]
        except Exception as e:  # a damaged archive, or object arrays (pickles) inside it
            raise CheckpointError(f"cannot read .npz archive {path}: {e}") from e
        return tree
    if not trust_pickle:
        raise CheckpointError(
            f"{path} is a pickle (DeepMind's Haiku weight files are dill pickles despite the "
            ".npz suffix). Unpickling can execute code from the file, so normfree only reads it "
            "with trust_pickle=True (CLI: --trust-pickle; create_model: pretrained_cfg_overlay="
            "dict(file=PATH, trust_pickle=True); a model: model.load_pretrained(PATH, "
            "trust_pickle=True)); do that only for files you trust."
        )
    try:
        with open(path, "rb") as f:
            raw = _RestrictedUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"cannot read Haiku weight file {path}: {e}") from e
    except Exception as e:  # a corrupt pickle fails in many ways (TypeError, MemoryError…)
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise CheckpointError(
            f"cannot read Haiku weight file {path} ({why}): the file is corrupt"
        ) from e
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of module paths, got {type(raw)}")
    for module, params in raw.items():
        if not isinstance(params, Mapping):
            raise CheckpointError(
                f"{path}: module {module!r} holds a {type(params).__name__}, not a mapping of "
                "parameter arrays"
            )
        arrays = {str(k): np.asarray(v) for k, v in params.items()}
        for name, array in arrays.items():
            if array.dtype.kind not in "biuf":
                raise CheckpointError(
                    f"{path}: {module}/{name} is not a numeric array (dtype {array.dtype})"
                )
        tree[str(module)] = arrays
    return tree


_BLOCK = re.compile(r"^NFNet/~/nf_block(?:_(\d+))?/~/(.+)$")
_SKIP = re.compile(r"^NFNet/~/nf_block(?:_(\d+))?$")
_CONV = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
         "conv_shortcut": "downsample.conv"}
_SE = {"squeeze_excite/~/linear": "attn_last.fc1", "squeeze_excite/~/linear_1": "attn_last.fc2"}
_PARAM = {"w": "weight", "b": "bias", "gain": "gain", "bias": "bias"}


def _block_positions(model: nn.Module) -> list[tuple[int, int]]:
    if not isinstance(model, NFNet):
        raise CheckpointError(
            "DeepMind's NFNet weights map onto normfree's NFNet models (the nfnet_* models), "
            f"not a {type(model).__name__}"
        )
    return [(s, b) for s, stage in enumerate(model.stages) for b in range(len(stage))]


def _to_torch(name: str, array: np.ndarray, is_linear: bool) -> torch.Tensor:
    t = torch.tensor(np.asarray(array, dtype=np.float32))  # keeps 0-d skip gains 0-d
    if name.endswith("weight"):
        if t.dim() == 4:  # HWIO -> OIHW
            t = t.permute(3, 2, 0, 1)
        elif t.dim() == 2:  # (in, out) -> (out, in)
            t = t.t()
            if not is_linear:  # SE linears are 1x1 convs in normfree
                t = t[:, :, None, None]
    return t.contiguous()


def deepmind_to_normfree(
    tree: Mapping[str, Mapping[str, np.ndarray]], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename and re-layout an official NFNet parameter tree into ``model``'s state-dict keys."""
    positions = _block_positions(model)
    out: dict[str, torch.Tensor] = {}
    for module, params in tree.items():
        for pname, array in params.items():
            target = _target_name(module, pname, positions)
            out[target] = _to_torch(target, np.asarray(array), is_linear=target.startswith("head."))
    return out


def _target_name(module: str, pname: str, positions: list[tuple[int, int]]) -> str:
    def block(idx: str | None) -> str:
        k = int(idx) if idx else 0
        if k >= len(positions):
            raise CheckpointError(
                f"weight file has block {module} but the model has only {len(positions)} blocks "
                "(wrong variant?)"
            )
        s, b = positions[k]
        return f"stages.{s}.{b}"

    m = _SKIP.match(module)
    if m and pname == "skip_gain":
        return f"{block(m.group(1))}.skip_gain.gain"
    param = _PARAM.get(pname)
    if param is None:
        raise CheckpointError(f"unknown parameter {module}/{pname} in the weight file")
    if module.startswith("NFNet/~/stem_conv"):
        return f"stem.conv{int(module[len('NFNet/~/stem_conv'):]) + 1}.{param}"
    if module == "NFNet/~/final_conv":
        return f"final.conv.{param}"
    if module == "NFNet/~/linear":
        return f"head.fc.{param}"
    m = _BLOCK.match(module)
    if m:
        sub = m.group(2)
        if sub in _CONV:
            return f"{block(m.group(1))}.{_CONV[sub]}.{param}"
        if sub in _SE:
            return f"{block(m.group(1))}.{_SE[sub]}.{param}"
    raise CheckpointError(f"unknown module {module!r} in the weight file")


def normfree_to_deepmind(model: nn.Module) -> dict[str, dict[str, np.ndarray]]:
    """The inverse mapping: a normfree NFNet as an official parameter tree (HWIO, ``(in, out)``).
    Used to write test fixtures and to hand weights back to the JAX code."""
    positions = {pos: k for k, pos in enumerate(_block_positions(model))}
    inv_conv = {v: k for k, v in _CONV.items()}
    inv_se = {v: k for k, v in _SE.items()}
    inv_param = {"weight": "w", "gain": "gain"}
    tree: dict[str, dict[str, np.ndarray]] = {}
    for key, t in model.state_dict().items():
        a = t.detach().cpu().float()
        parts = key.split(".")
        if key.startswith("stem.conv"):
            module = f"NFNet/~/stem_conv{int(parts[1][4:]) - 1}"
            pname = inv_param.get(parts[2], "bias")
        elif key.startswith("final.conv."):
            module, pname = "NFNet/~/final_conv", inv_param.get(parts[2], "bias")
        elif key.startswith("head.fc."):
            module, pname = "NFNet/~/linear", "w" if parts[2] == "weight" else "b"
        elif key.startswith("stages."):
            k = positions[(int(parts[1]), int(parts[2]))]
            blk = "NFNet/~/nf_block" + (f"_{k}" if k else "")
            rest = ".".join(parts[3:-1])
            if rest == "skip_gain":
                tree.setdefault(blk, {})["skip_gain"] = a.numpy()
                continue
            if rest in inv_conv:
                module, pname = f"{blk}/~/{inv_conv[rest]}", inv_param.get(parts[-1], "bias")
            elif rest in inv_se:
                module, pname = f"{blk}/~/{inv_se[rest]}", "w" if parts[-1] == "weight" else "b"
            else:
                raise CheckpointError(f"no official name for {key}")
        else:
            raise CheckpointError(f"no official name for {key}")
        if pname == "w":
            a = a.permute(2, 3, 1, 0) if module.endswith(tuple(_CONV)) or "stem_conv" in module \
                or module.endswith("final_conv") else a.reshape(a.shape[0], a.shape[1]).t()
        tree.setdefault(module, {})[pname] = a.contiguous().numpy()
    return tree
